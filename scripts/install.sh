#!/usr/bin/env bash
# Installs trl-kto-ext (editable) and its dependencies; usage: scripts/install.sh ["[dev]"].
# Torch first: the CPU wheel 2.13.0 when no torch is present, so that pip does not pull a multi-GB CUDA build; a torch
# already installed (e.g. a CUDA build) is kept.
# The pip install is skipped when this checkout is already installed editable in this Python, its metadata is newer
# than setup.cfg and pyproject.toml, and every requirement (with the asked extras, and theirs, recursively) is
# installed at a version it allows. TRL_KTO_EXT_REINSTALL=1 forces the install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

python -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null || python -m pip install "torch==2.13.0"

installed_here() {  # exit 0 when `pip install -e .$extras` would change nothing
    python - "$PWD" "$extras" <<'PY' 2>/dev/null
import importlib.metadata as md
import json
import os
import shutil
import sys
from urllib.parse import unquote, urlparse

from packaging.requirements import Requirement

root, extras = os.path.realpath(sys.argv[1]), sys.argv[2].strip("[] ")
# Not the checkout itself: its trl_kto_ext.egg-info (left by pip's build) is not the installed distribution.
sys.path = [p for p in sys.path if p and os.path.realpath(p) != root]
dist = md.distribution("trl-kto-ext")
url = json.loads(dist.read_text("direct_url.json") or "{}")
assert url.get("dir_info", {}).get("editable"), "not an editable install"
assert os.path.realpath(unquote(urlparse(url["url"]).path)) == root, "installed from another checkout"
metadata = next(f for f in dist.files or [] if f.name == "METADATA" and f.parent.name.endswith(".dist-info"))
metadata = dist.locate_file(metadata)
assert all(
    os.path.getmtime(metadata) >= os.path.getmtime(os.path.join(root, f)) for f in ("setup.cfg", "pyproject.toml")
), "setup.cfg or pyproject.toml changed since the install"
assert shutil.which("trl-kto-ext"), "no trl-kto-ext command on PATH"

todo = [(dist, {e.strip() for e in extras.split(",") if e.strip()})]
seen = set()
while todo:
    parent, wanted = todo.pop()
    for line in parent.requires or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
            continue
        child = md.distribution(req.name)  # PackageNotFoundError: missing
        assert req.specifier.contains(child.version, prereleases=True), f"{req.name} {child.version} not {req}"
        key = (req.name.lower(), frozenset(req.extras))
        if key not in seen:
            seen.add(key)
            todo.append((child, set(req.extras)))
PY
}

if [[ "${TRL_KTO_EXT_REINSTALL:-0}" != 1 ]] && installed_here; then
    echo "trl-kto-ext${extras} is already installed from this checkout with its dependencies: pip install skipped" \
        "(TRL_KTO_EXT_REINSTALL=1 forces it)"
else
    python -m pip install -e ".${extras}"
fi
