"""Per-parameter Kronecker preconditioner of APO-Precond.

For a weight W of shape (out, in, ...) viewed as a matrix (out, in·...) with gradient G:

    P(G) = L · G · R,   L = A Aᵀ (out × out),   R = B Bᵀ (in × in),

positive semi-definite by construction and equal to the identity at the start (A = B = I). Only the shorter side
of a weight is dense (both sides of a square one; any side of at most 64, where a dense factor costs next to
nothing), and only up to ``max_factor_dim``; the other side, and the
vocabulary side of embeddings and LM heads, is diagonal: L = diag(a²). A dense side of length d costs d² factor
entries (plus d² for the cached product and 2·d² for meta-Adam), so the factor entries of a Transformer stay about
its parameter count: 2× for a square d × d weight, ¼× for a d × 4d FFN weight. A parameter with fewer than two
dimensions (bias, norm scale) gets a learned scalar: P(g) = s² · g.

No inverse and no eigendecomposition appear, so the factors are stable in bf16 models; they are kept in
``promote_types(param.dtype, float32)``: float32 for bf16/fp16/fp32 models, float64 for float64 ones. L and R are
cached between meta steps (they only change there); until the first meta update P is the identity and skipped.
"""

from __future__ import annotations

import torch


SMALL_SIDE = 64  # a dense factor this small costs next to nothing, whatever the other side


def _dense(side: int, other_side: int, max_factor_dim: int) -> bool:
    """Whether a side of this length gets a dense factor (see the module docstring)."""
    return side <= max_factor_dim and (side <= other_side or side <= SMALL_SIDE)


def _materialize(factor: torch.Tensor) -> torch.Tensor:
    """AAᵀ for a dense factor, a² (the diagonal) for a diagonal one."""
    return factor @ factor.T if factor.dim() == 2 else factor * factor


class KroneckerFactors:
    """The meta-parameters φ of one model parameter and the preconditioning they define."""

    def __init__(self, param: torch.Tensor, max_factor_dim: int, diagonal_rows: bool = False):
        self.param_shape = param.shape
        self.dtype = torch.promote_types(param.dtype, torch.float32)
        options = {"dtype": self.dtype, "device": param.device}
        if param.dim() >= 2:
            rows, cols = param.shape[0], param[0].numel()
            dense_left = _dense(rows, cols, max_factor_dim) and not diagonal_rows
            dense_right = _dense(cols, rows, max_factor_dim)
            self.left = torch.eye(rows, **options) if dense_left else torch.ones(rows, **options)
            self.right = torch.eye(cols, **options) if dense_right else torch.ones(cols, **options)
            self.tensors = [self.left, self.right]
        else:
            self.scale = torch.ones((), **options)
            self.tensors = [self.scale]
        self.is_identity = True
        self._cache: list[torch.Tensor] = []

    @property
    def kind(self) -> str:
        if len(self.tensors) == 1:
            return "scale"
        return "x".join("dense" if t.dim() == 2 else "diag" for t in self.tensors)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def refresh(self) -> None:
        """Recompute the cached L and R after the factors changed (once per meta step)."""
        with torch.no_grad():
            self._cache = [_materialize(t) for t in self.tensors]
        self.is_identity = False

    def _apply(self, grad: torch.Tensor, materialized: list[torch.Tensor]) -> torch.Tensor:
        g = grad.to(self.dtype)
        if len(materialized) == 1:
            return materialized[0] * g
        left, right = materialized
        g = g.reshape(g.shape[0], -1)
        g = left @ g if left.dim() == 2 else left[:, None] * g
        g = g @ right if right.dim() == 2 else g * right[None, :]
        return g.reshape(self.param_shape)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """P(grad) with the cached factors, in the gradient's dtype; ``grad`` itself while P is the identity."""
        if self.is_identity:
            return grad
        return self._apply(grad, self._cache).to(grad.dtype)

    def precondition_differentiable(self, grad: torch.Tensor) -> torch.Tensor:
        """P(grad) in the factor dtype, recorded by autograd w.r.t. the factor tensors (which must require grad)."""
        return self._apply(grad, [_materialize(t) for t in self.tensors])

    def traces(self) -> list[float]:
        """tr(L)/out and tr(R)/in (the mean eigenvalue of each side), or s² for a scalar."""
        if self.is_identity:
            return [1.0] * len(self.tensors)
        return [float((m.diagonal() if m.dim() == 2 else m).mean()) for m in self._cache]
