"""Package surface: public names, and a light import (no bitsandbytes until a trainer or config is used)."""

import subprocess
import sys

import trl

import trl_kto_ext


def test_public_names_and_trl_subclasses():
    from trl_kto_ext import KTOExtCollator, KTOExtConfig, KTOExtTrainer, kto_loss

    assert issubclass(KTOExtConfig, trl.KTOConfig)
    assert issubclass(KTOExtTrainer, trl.KTOTrainer)
    assert callable(kto_loss) and callable(KTOExtCollator)
    assert set(trl_kto_ext.__all__) >= {"KTOExtConfig", "KTOExtTrainer", "KTOExtCollator", "kto_loss"}


def test_import_does_not_load_bitsandbytes():
    code = (
        "import sys, trl_kto_ext\n"
        "from trl_kto_ext import kto_loss\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported eagerly'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
