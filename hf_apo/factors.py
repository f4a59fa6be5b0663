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

import math
import warnings

import torch

from .distributed import is_sharded, local_tensor

SMALL_SIDE = 64  # a dense factor this small costs next to nothing, whatever the other side
SPARSE_ROWS = 4096  # a diagonal row side this long skips the rows of P's input that are zero (a vocabulary's)


def _dense(side: int, other_side: int, max_factor_dim: int) -> bool:
    """Whether a side of this length gets a dense factor (see the module docstring)."""
    return side <= max_factor_dim and (side <= other_side or side <= SMALL_SIDE)


def _materialize(factor: torch.Tensor) -> torch.Tensor:
    """AAᵀ for a dense factor, a² (the diagonal) for a diagonal one."""
    return factor @ factor.T if factor.dim() == 2 else factor * factor


def _add_sparse_rows_(target, g, left, right, alpha: float) -> bool:
    """target += alpha · diag(left)·g·right over the rows where g is not zero, when g has ``SPARSE_ROWS`` rows or more
    and half of them or more are zero (e.g. an input embedding's rows of the tokens never seen, m = 0); P(G)'s row r is
    l_r·(G_r·R), so a zero row moves nothing. False (nothing done) otherwise."""
    if g.shape[0] < SPARSE_ROWS:
        return False
    rows = g.ne(0).any(dim=1).nonzero().squeeze(1)
    if 2 * rows.numel() > g.shape[0]:
        return False
    touched = g.index_select(0, rows).mul_(left.index_select(0, rows)[:, None])
    target.index_add_(0, rows, touched @ right, alpha=alpha)
    return True


class KroneckerFactors:
    """The meta-parameters φ of one model parameter and the preconditioning they define."""

    def __init__(self, param: torch.Tensor, max_factor_dim: int, diagonal_rows: bool = False):
        # Sharded (hf_apo.distributed): ``param`` holds this rank's rows; the factors act on that shard, with a
        # diagonal row side over its own rows. Which side is dense is decided from the full shape.
        sharded = is_sharded(param)
        local = local_tensor(param)
        self.param_shape = local.shape
        self.dtype = torch.promote_types(param.dtype, torch.float32)
        options = {"dtype": self.dtype, "device": local.device}
        if param.dim() >= 2:
            rows, cols = param.shape[0], math.prod(param.shape[1:])  # the full shape, not this shard's
            dense_left = _dense(rows, cols, max_factor_dim) and not (diagonal_rows or sharded)
            dense_right = _dense(cols, rows, max_factor_dim)
            self.left = torch.eye(rows, **options) if dense_left else torch.ones(local.shape[0], **options)
            self.right = torch.eye(cols, **options) if dense_right else torch.ones(cols, **options)
            self.tensors = [self.left, self.right]
        else:
            self.scale = torch.ones((), **options)
            self.tensors = [self.scale]
        # per tensor: whether this rank's meta-gradient of it is a partial sum over the shards' rows; the
        # others (a sharded weight's diagonal row side) hold this rank's rows only
        self.summed_over_shards = [sharded and t is not getattr(self, "left", None) for t in self.tensors]
        self.rows_are_local = [sharded and not summed for summed in self.summed_over_shards]
        # the full length of each side (its number of eigenvalues), this rank's shard or not; 1 for a scale
        self.sides = [param.shape[0], math.prod(param.shape[1:])] if param.dim() >= 2 else [1]
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

    def _apply(self, grad: torch.Tensor, materialized: list[torch.Tensor], owned: bool = False) -> torch.Tensor:
        """P(grad) in the factor dtype. ``owned``: ``grad`` is a temporary the caller gives up, so the element-wise
        products run in place in it (the same values: a parameter-size temporary fewer per diagonal side or scale)."""
        g = grad.to(self.dtype)
        owned = owned or g is not grad  # a cast is a fresh copy
        if len(materialized) == 1:
            return g.mul_(materialized[0]) if owned else materialized[0] * g
        left, right = materialized
        g = g.reshape(g.shape[0], -1)
        if left.dim() == 2:
            g = left @ g
        else:
            g = g.mul_(left[:, None]) if owned else left[:, None] * g
        g = g @ right if right.dim() == 2 else g.mul_(right[None, :])  # g is a fresh product here
        return g.reshape(self.param_shape)

    def precondition(self, grad: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """P(grad) with the cached factors, in the gradient's dtype; ``grad`` itself while P is the identity.
        ``owned``: ``grad`` may be overwritten (:meth:`_apply`)."""
        if self.is_identity:
            return grad
        return self._apply(grad, self._cache, owned).to(grad.dtype)

    def precondition_full(self, grad: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """P(grad) in the factor dtype (float32 for a bf16 gradient), with the current factors; ``owned`` as above."""
        return self._apply(grad, self._materialized(), owned)

    def add_preconditioned_(self, target: torch.Tensor, grad: torch.Tensor, alpha: float, cached: bool = True,
                            owned: bool = False) -> None:
        """target += alpha · P(grad) in place, with the cached factors (``cached``) or the current ones; ``owned`` as
        in :meth:`_apply`. A dense right side's product is accumulated into the target by ``addmm_``, without a
        parameter-size temporary for P(grad); it rounds α·(G·R) + θ once where ``add_`` rounds G·R first (within an
        ulp of θ). A diagonal row side of ``SPARSE_ROWS`` or more rows, half of them zero in ``grad`` or more, updates
        the other rows only (``index_add_``): a zero row of P(grad) leaves θ's row as it is. A target in another dtype
        than the factors' gets P(grad) cast to it, then ``add_``."""
        materialized = self._cache if cached else self._materialized()
        if len(materialized) == 1 or materialized[1].dim() != 2 or target.dtype != self.dtype \
                or not target.is_contiguous():
            target.add_(self._apply(grad, materialized, owned).to(target.dtype), alpha=alpha)
            return
        left, right = materialized
        g = grad.to(self.dtype)
        owned = owned or g is not grad  # a cast is a fresh copy
        g = g.reshape(g.shape[0], -1)
        if left.dim() == 2:
            g = left @ g
        elif _add_sparse_rows_(target.view(g.shape), g, left, right, alpha):
            return
        else:
            g = g.mul_(left[:, None]) if owned else left[:, None] * g
        target.view(g.shape).addmm_(g, right, alpha=alpha)

    def vjp(self, grad: torch.Tensor, cotangent: torch.Tensor, owned: bool = False) -> list[torch.Tensor]:
        """∂⟨U, P_φ(G)⟩/∂t for each factor tensor t (U = ``cotangent``, G = ``grad``), by hand, in the factor dtype.

        With L = AAᵀ, R = BBᵀ and P(G) = L·G·R:  ∂/∂L = U·(G·R)ᵀ = (U·R)·Gᵀ and ∂/∂R = (L·G)ᵀ·U = Gᵀ·(L·U), then
        ∂/∂A = (M + Mᵀ)·A for M = ∂/∂L (a diagonal side a: ∂/∂a = 2a ⊙ diag(M), only the diagonal is formed).
        Two matmuls per dense side and one parameter-size temporary at a time: no autograd graph, no L·G or G·R kept.
        ``owned``: the cotangent is a temporary the caller gives up; the element-wise products then run in place.
        """
        g = grad.to(self.dtype)
        u = cotangent.to(self.dtype)
        owned = owned or u is not cotangent
        if len(self.tensors) == 1:
            return [2 * self.scale * (u.mul_(g) if owned else u * g).sum()]
        left, right = self._materialized()
        g = g.reshape(g.shape[0], -1)
        u = u.reshape(u.shape[0], -1)
        # left side: M = (U·R)·Gᵀ
        ur = u @ right if right.dim() == 2 else u * right[None, :]
        if self.left.dim() == 2:
            m = ur @ g.T
            grad_left = (m + m.T) @ self.left
        else:
            grad_left = 2 * self.left * ur.mul_(g).sum(dim=1)  # ur is a fresh product
        del ur
        # right side: N = Gᵀ·(L·U)
        if left.dim() == 2:
            lu = left @ u
        else:
            lu = u.mul_(left[:, None]) if owned else left[:, None] * u
        if self.right.dim() == 2:
            n = g.T @ lu
            grad_right = (n + n.T) @ self.right
        else:
            grad_right = 2 * self.right * lu.mul_(g).sum(dim=0)  # lu is a fresh product or the owned U
        return [grad_left, grad_right]

    def squared_norms(self) -> torch.Tensor:
        """tr(L) = ‖A‖²_F per side (Σa² for a diagonal one, s² for a scale), in the factor dtype; a diagonal row side
        over this rank's rows gives this rank's part (sum it over the shards, ``rows_are_local``)."""
        return torch.stack([t.square().sum() for t in self.tensors])

    def normalize_(self, squared_norms: torch.Tensor) -> None:
        """Rescale each side to shape only, tr(L)/n = 1 (mean eigenvalue 1; a scale s² = 1), from the sides'
        :meth:`squared_norms` (summed over the shards where the rows are local). A side whose norm is zero or not
        finite is left as it is. Then the cached L and R are refreshed.

        The size of a Kronecker product is a gauge (cL ⊗ R/c is the same P), so normalizing each side fixes the size of
        P to tr(P)/numel = 1: the learning rate carries the size, the factors the shape."""
        with torch.no_grad():
            for tensor, squared, side in zip(self.tensors, squared_norms.tolist(), self.sides):
                if math.isfinite(squared) and squared > 0:
                    tensor.mul_(math.sqrt(side / squared))
        self.refresh()

    def _materialized(self) -> list[torch.Tensor]:
        """L and R (or s²): the cache when it is current, else computed from the factors (identity at the start)."""
        if self.is_identity or len(self._cache) != len(self.tensors):
            return [_materialize(t) for t in self.tensors]
        return self._cache

    def traces(self) -> list[float]:
        """tr(L)/out and tr(R)/in (the mean eigenvalue of each side), or s² for a scalar."""
        if self.is_identity:
            return [1.0] * len(self.tensors)
        return [float((m.diagonal() if m.dim() == 2 else m).mean()) for m in self._cache]


def spectral_norm_lower_bound(matrix: torch.Tensor) -> torch.Tensor:
    """A cheap lower bound on ‖matrix‖₂ (within a small factor of it in practice), without state or SVD.

    PSGD's ``norm_lower_bound`` (Li, "Preconditioned stochastic gradient descent", 2018; psgd_torch): one power
    iteration started from the row or column of largest norm.
    """
    max_abs = matrix.abs().max()
    if max_abs == 0:
        return max_abs
    a = matrix / max_abs
    squares = a * a
    column_norm, column = squares.sum(dim=0).max(dim=0)
    row_norm, row = squares.sum(dim=1).max(dim=0)
    if column_norm > row_norm:
        x = a[:, column] @ a
        return max_abs * torch.linalg.vector_norm((x / torch.linalg.vector_norm(x)) @ a.T)
    x = a @ a[row]
    return max_abs * torch.linalg.vector_norm(a.T @ (x / torch.linalg.vector_norm(x)))


class FactorAdam(torch.optim.Optimizer):
    """Adam over the factors, with a second moment that respects a dense factor's geometry.

    A diagonal factor or a scale gets Adam per entry (``torch.optim.Adam``'s update, without its options). A dense
    factor A (d × d) gets one second moment for the whole matrix, of its gradient's spectral norm s (a lower bound,
    :func:`spectral_norm_lower_bound`):  m ← β₁m + (1 − β₁)G,  v ← β₂v + (1 − β₂)s²,  A ← A − lr · m̂/(√v̂ + ε),
    so a meta step moves L = AAᵀ's spectrum by about lr whatever d. Per-entry Adam turns a structured gradient into
    a sign matrix whose spectral norm grows like d·lr, so the largest eigenvalue of L can grow several-fold in one
    meta step (docs/method.md). ``spectral=False`` gives per-entry Adam to dense factors too.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 spectral: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, spectral=spectral))

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a saved state, including one saved under the other geometry or by ``torch.optim.Adam``.

        The hyperparameters stay this optimizer's (the run's own flags); only the moments and step counts load. A
        dense factor's second moment saved per entry (``torch.optim.Adam``'s layout, or ``spectral=False``) becomes
        the scalar of the spectral step as its sum, E‖G‖²_F ≥ E‖G‖²₂; a saved scalar becomes a per-entry one by
        broadcasting. Both over-estimate, so the first steps after the switch are
        smaller, never larger, and a warning says so.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("FactorAdam.load_state_dict: the saved state has a different number of parameter groups.")
        groups = [{**{k: v for k, v in current.items() if k != "params"}, "params": saved["params"]}
                  for current, saved in zip(self.param_groups, saved_groups)]
        super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
        converted = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                state["step"] = int(state["step"])
                for key in [k for k in state if k not in ("step", "exp_avg", "exp_avg_sq")]:
                    del state[key]  # torch.optim.Adam's max_exp_avg_sq and the like
                whole = group["spectral"] and p.dim() == 2
                second = state["exp_avg_sq"]
                if whole and second.dim() != 0:
                    state["exp_avg_sq"] = second.sum()
                    converted += 1
                elif not whole and second.dim() == 0 and p.dim() != 0:
                    state["exp_avg_sq"] = second.expand_as(p).clone()
                    converted += 1
        if converted:
            warnings.warn(
                f"APO-Precond: the saved meta-optimizer state of {converted} factor(s) was kept under the other meta "
                "step (per-entry Adam vs --apo_spectral_meta_step); their second moments were converted to an upper "
                "bound, so the next few meta steps are smaller than usual.",
                stacklevel=2,
            )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                whole = group["spectral"] and p.dim() == 2
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device) if whole else torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad
                state["exp_avg"].lerp_(grad, 1 - beta1)
                square = spectral_norm_lower_bound(grad).square() if whole else grad * grad
                state["exp_avg_sq"].mul_(beta2).add_(square, alpha=1 - beta2)
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                denominator = (state["exp_avg_sq"] / bias2).sqrt().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / bias1)
