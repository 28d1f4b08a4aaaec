"""Loss aversion over a rolling window of label counts, for online KTO where the class balance drifts."""

from __future__ import annotations

from collections import deque

from trl_kto_ext.loss_aversion import LossAversion, resolve_loss_aversion


class RollingLossAversion:
    """lambda_D / lambda_U from the label counts of the last `window` steps (the current one included).

    `"auto"`: lambda_U = 1 and lambda_D = target * n_U / n_D over the window, through [`resolve_loss_aversion`], so
    lambda_D * n_D / (lambda_U * n_U) = target on the window. While the window holds one class only, the weights of
    the last window that held both are kept (1 and 1 before any): the absent class is absent from the current step
    too, so its weight does not enter that step's loss. `"manual"`: the given weights, with the window's ratio.

    Example: window 2, steps with (n_D, n_U) = (1, 7), (3, 5), (6, 2): lambda_D = 7, 12/4 = 3, 7/9.
    """

    def __init__(self, window: int, mode: str = "auto", target: float = 1.0, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):  # fmt: skip
        self.window = int(window)
        self.mode, self.target = mode, float(target)
        self._manual = (float(desirable_weight), float(undesirable_weight))
        self._counts: deque[tuple[int, int]] = deque(maxlen=self.window)
        self._weights = self._manual if mode == "manual" else (1.0, 1.0)
        self.last: LossAversion | None = None  # the weights and window counts of the latest step

    def update(self, n_desirable: int, n_undesirable: int) -> LossAversion:
        """Adds one step's counts; returns the weights for that step with the window's counts."""
        self._counts.append((int(n_desirable), int(n_undesirable)))
        n_d = sum(d for d, _ in self._counts)
        n_u = sum(u for _, u in self._counts)
        if self.mode == "auto" and n_d > 0 and n_u > 0:
            resolved = resolve_loss_aversion(n_d, n_u, mode="auto", target=self.target)
            self._weights = (resolved.desirable_weight, resolved.undesirable_weight)
        self.last = LossAversion(*self._weights, n_d, n_u, self.mode)
        return self.last

    def state_dict(self) -> dict:
        return {"counts": [list(c) for c in self._counts], "weights": list(self._weights)}

    def load_state_dict(self, state: dict) -> None:
        self._counts = deque((tuple(c) for c in state["counts"]), maxlen=self.window)
        self._weights = tuple(state["weights"])
