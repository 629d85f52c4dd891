"""bSAM: the Bayesian, Adam-like SAM of "SAM as an Optimal Relaxation of Bayes"."""

from __future__ import annotations

import contextlib
import numbers
import secrets
from collections.abc import Iterator
from typing import Any

import torch

from . import _distributed, _philox, backends
from .optimizer import TwoPassOptimizer, check_betas, check_number, devices_of, state_dtype


class BSAM(TwoPassOptimizer):
    r"""bSAM (Möllenhoff & Khan, ICLR 2023), exactly as the authors' code computes it (ALGORITHM.md).

    Learns a Gaussian posterior :math:`q(θ) = N(m, \mathrm{diag}(1/(N s)))` over the
    weights. One step, with the minibatch cut into ``splits`` sub-batches
    :math:`B_1..B_k`::

        for j in 1..k:
            z_j ~ N(0, I)                       # Philox, a function of (seed, step, j, element)
            θ   = m + z_j / sqrt(N·s)            # noisy sample of the posterior
            g_j = ∇ L_Bj(θ)
            θ   = m + ρ · g_j / s                # adversarial point, from the mean
            h_j = ∇ L_Bj(θ)
        h̄ = mean_j h_j ;  ā = mean_j sqrt(s)·|g_j|
        g_m = β1·g_m + (1 − β1)·(h̄ + δ·m)       # momentum
        m   = m − α·g_m / s                      # mean, with the old precision
        s   = β2·s + (1 − β2)·(ā + δ + γ)        # precision
        θ   = m

    Args:
        params: parameters or parameter groups (every hyperparameter below may be set per group).
        num_data: N, the training-set size (times the augmentation factor, if any). > 0.
        lr: α. ``betas``: (β1, β2) in [0, 1). ``rho``: ρ >= 0, the adversarial radius.
        weight_decay: δ >= 0, the prior precision divided by N.
        damping: γ >= 0. ``init_precision``: s0 > 0.
        seed: the noise seed, an integer in [0, 2^64); None draws one from the operating system
            (not from ``torch``'s generator, whose streams the user's shuffling and dropout use).
        backend: "auto", "eager", "foreach", "triton", "cpu" or "cuda" (see :mod:`sambayes.backends`).
        model: the module being trained (also accepted in place of ``params``). When
            given, the optimizer manages its BatchNorm statistics (``bn_stats``) and, for a
            DDP module, skips the all-reduce of the noisy pass and averages the precision
            statistic across replicas; each replica draws its own noise (m-sharpness
            across devices: sub-batch index ``j * world_size + rank``).
        bn_stats: which pass updates BatchNorm running statistics: "noisy" (default),
            "perturbed" or "both". Needs ``model``.
        keep_sums: whether the step's running sums (the curvature sum, and with splits > 1 the
            sum of the perturbed-point gradients: 4 bytes per parameter each) stay allocated
            between steps. None (default): on the CPU only, where allocating them again every
            step maps fresh pages (measured: +23% of a step); elsewhere the caching allocator
            hands the same memory back, so they live only within a step and the optimizer keeps
            12 bytes per float32 parameter between steps.
        state_dtype: None (default) keeps ``precision`` and ``momentum`` in the mean's dtype;
            ``torch.bfloat16`` keeps them in bfloat16 (8 bytes per parameter in all instead of
            12; not for float64 parameters). The math still runs in float32; the update stores
            them with stochastic rounding from a counter-based stream (:mod:`sambayes._philox`,
            "Stochastic rounding"): deterministic, resumable and the same in every backend, and
            unbiased, so that the precision's small steps (1 − β2 = 0.001 of a value, below
            bfloat16's resolution of 2^-8) are not lost as rounding to nearest would lose them.
        capturable: True to capture whole steps in a CUDA graph (as torch.optim.Adam's ``capturable``):
            the noise and rounding seeds are hashed on the device from the step counters, a tensor
            ``lr`` is read by the kernels, and nothing is copied to the host per step (the warning
            for a skipped step comes when ``skipped_steps`` or ``state_dict()`` is read). A float
            ``lr`` is baked into a captured graph; pass a 0-dim float64 tensor on the device to change
            it between replays. The same numbers as ``capturable=False``; see README. Capturing a
            step without it (or on the eager backend) raises RuntimeError.

    State per parameter: ``mean`` (m), ``precision`` (s), ``momentum`` (g_m): float64
    for float64 parameters, float32 otherwise (``precision`` and ``momentum``: bfloat16
    with ``state_dtype=torch.bfloat16``). Per group: ``step`` (updates taken) and
    ``skipped_steps`` (steps skipped for a non-finite gradient), 0-dim device tensors
    counted without a host sync; ``attempts`` (their sum, a host int); ``seed``. The
    noise of a step is ``noise_seed(seed, group index, attempts, j)`` (see
    :mod:`sambayes._philox`), so the same seed gives the same run on every backend.
    Between steps the model's parameters hold the mean.
    """

    def __init__(
        self,
        params,
        *,
        num_data: float,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        rho: float = 0.01,
        weight_decay: float = 0.0,
        damping: float = 0.1,
        init_precision: float = 1.0,
        seed: int | None = None,
        backend: str = "auto",
        model: torch.nn.Module | None = None,
        bn_stats: str = "noisy",
        keep_sums: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
    ) -> None:
        seed = _check_seed(seed, allow_none=True)
        if state_dtype not in (None, torch.bfloat16):
            raise ValueError(
                f"state_dtype={state_dtype!r}: None (precision and momentum in the mean's dtype) or torch.bfloat16"
            )
        #: the dtype of ``precision`` and ``momentum``: None for the mean's, or torch.bfloat16
        self.state_dtype = state_dtype
        defaults = dict(
            num_data=num_data,
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            rho=rho,
            weight_decay=weight_decay,
            damping=damping,
            init_precision=init_precision,
            seed=seed,
        )
        super().__init__(params, defaults, backend, model, bn_stats, keep_sums, capturable)
        if self._sync_group() is not None:  # replicas share one seed, whatever each was given
            bits = self.param_groups[0]["seed"]  # as int64 bits: a seed may exceed 2^63
            seed_tensor = torch.tensor(
                [bits - 2**64 if bits >= 2**63 else bits], device=_distributed.comm_device(self._sync_group())
            )
            torch.distributed.broadcast(seed_tensor, src=0, group=self._sync_group())
            for group in self.param_groups:
                group["seed"] = int(seed_tensor) % 2**64

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "state_dtype": self.state_dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with the state and groups only
        self.__dict__.setdefault("state_dtype", None)

    def _check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            self._state_dtype("precision", p)  # ValueError for a float64 parameter with bfloat16 state
        group["seed"] = _check_seed(group["seed"], allow_none=True)
        check_number("num_data", group["num_data"], low_open=True)
        check_number("lr", group["lr"])
        check_betas(group["betas"])
        check_number("rho", group["rho"])
        check_number("weight_decay", group["weight_decay"])
        check_number("damping", group["damping"])
        check_number("init_precision", group["init_precision"], low_open=True)

    def _state_keys(self) -> set[str]:
        return {"mean", "precision", "momentum"}

    def _state_dtype(self, key: str, param: torch.Tensor) -> torch.dtype:
        if self.state_dtype is None or key == "mean":
            return state_dtype(param)
        if param.dtype == torch.float64:  # given so, or cast so after construction (model.double())
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} is float64: state_dtype={self.state_dtype} is for "
                "float32, bfloat16 and float16 parameters (float64 ones keep float64 state: use the default)"
            )
        return self.state_dtype

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["mean"] = _distributed.local(p).detach().to(state_dtype(p), copy=True)
        state["precision"] = torch.full_like(
            state["mean"], group["init_precision"], dtype=self._state_dtype("precision", p)
        )
        state["momentum"] = torch.zeros_like(state["mean"], dtype=self._state_dtype("momentum", p))

    # ---- phases -----------------------------------------------------------------------
    def _sample_group(self, index: int, group: dict[str, Any], slots: list) -> None:
        self._draw(group, slots, self._step_seed(index, group, slots, self._noise_split(), counted=False))

    def _step_seed(self, index: int, group: dict[str, Any], slots: list, split: int, *, counted: bool) -> int | dict:
        """``noise_seed(seed, group, attempts, split)`` of this step (``counted``: the update has counted it
        already): from the host's count, or with capturable=True hashed on the device from its counters, so
        that a captured step replays with the count the device holds then ({device: 0-dim int64 tensor})."""
        if not self.capturable:
            return _philox.noise_seed(group["seed"], index, group["attempts"] - int(counted), split)
        attempts = self._attempts_on_device(group, counted=counted)
        key = _philox.noise_seed_on_device(group["seed"], index, attempts, split)
        return {device: key.to(device) for device in devices_of(slots)}

    def _draw(self, group: dict[str, Any], slots: list, seed: int | dict) -> None:
        """θ = m + z/sqrt(N·s) for the group's trainable parameters, z from Philox(seed) (an int, or
        {device: 0-dim int64 tensor} with capturable=True)."""
        if slots:
            backends.run(
                self.backend,
                "bsam_sample",
                self._local(slots),
                self._states(slots, "mean"),
                self._states(slots, "precision"),
                [s.offset for s in slots],  # element index: position in the group's flat concatenation
                num_data=group["num_data"],
                seed=seed,
            )

    def _perturb(self, inv_scale: dict) -> None:
        if self._split == 0:  # the curvature sums live from the first ascent to the update
            self._scratch("curvature_sum")
        for group, slots in zip(self.param_groups, self._group_slots):
            written = [s for s in slots if s.written]
            if self._split > 0:
                for s in written:
                    if not s.ascended:  # its first gradient of this step came late: sum from 0
                        s.curvature_sum.zero_()
            if written:
                backends.run(
                    self.backend,
                    "bsam_perturb",
                    self._local(written),
                    self._grads(written),
                    self._states(written, "mean"),
                    self._states(written, "precision"),
                    [s.curvature_sum for s in written],
                    found_inf=self._flags(),
                    inv_scale=inv_scale,
                    rho=group["rho"],
                    accumulate=self._split > 0,
                )
            self._restore([s for s in slots if not s.written])

    def _has_ascent(self, slot) -> bool:
        # the precision update needs this step's curvature estimate sqrt(s)·|g|
        return slot.ascended

    def _reduce_across_replicas(self) -> None:
        # DDP averages the gradients; the curvature sums are averaged here, in one call
        if not _distributed.is_ddp(self.model) or self._sync_group() is None:
            return
        # in parameter order: every rank must concatenate the same tensors in the same order
        sums = [s.curvature_sum for s in self._slots if s.ascended]
        world = torch.distributed.get_world_size(self._sync_group())
        for dtype in dict.fromkeys(s.dtype for s in sums):  # first-seen order: the same on every rank
            same = [s for s in sums if s.dtype == dtype]
            flat = torch.cat([s.flatten() for s in same])
            torch.distributed.all_reduce(flat, group=self._sync_group())
            flat /= world
            torch._foreach_copy_(same, [f.view_as(s) for f, s in zip(flat.split([s.numel() for s in same]), same)])

    def _update_group(self, index: int, group: dict[str, Any], slots: list, inv_scale: dict) -> None:
        beta1, beta2 = group["betas"]
        if slots:
            # stochastic rounding of bfloat16 state (_philox.rounding_seed); _count has counted this step
            rounding = self.state_dtype is not None
            seed = self._step_seed(index, group, slots, _philox.ROUNDING_STREAM, counted=True) if rounding else 0
            backends.run(
                self.backend,
                "bsam_update",
                self._local(slots),
                self._grads(slots),
                self._states(slots, "mean"),
                self._states(slots, "precision"),
                self._states(slots, "momentum"),
                [s.curvature_sum for s in slots],
                [s.offset for s in slots],  # element index: the rounding stream's counter
                found_inf=self._flags(),
                inv_scale=inv_scale,
                lr=self._lr(group, slots),
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                damping=group["damping"],
                splits=self._split,
                seed=seed,
            )

    # ---- the posterior ----------------------------------------------------------------
    def _posterior(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """(param, precision, group) for every trainable parameter; s0 where no state yet."""
        for group in self.param_groups:
            for p in self._trainable(group):
                state = self.state.get(p)
                if state:
                    yield p, state["precision"].to(state_dtype(p)), group  # bfloat16 state: in float32
                else:
                    yield (
                        p,
                        torch.full_like(_distributed.local(p), group["init_precision"], dtype=state_dtype(p)),
                        group,
                    )

    @torch.no_grad()
    def posterior_variance(self) -> list[torch.Tensor]:
        """σ² = 1/(N·s) for every trainable parameter, in its shape (state dtype)."""
        return [1.0 / (group["num_data"] * precision) for _, precision, group in self._posterior()]

    @torch.no_grad()
    def posterior_std(self) -> list[torch.Tensor]:
        """σ = 1/sqrt(N·s) for every trainable parameter, in its shape (state dtype)."""
        return [torch.rsqrt(group["num_data"] * precision) for _, precision, group in self._posterior()]

    @contextlib.contextmanager
    def sampled_params(self, seed: int = 0) -> Iterator[None]:
        """Within the block the model holds one sample θ ~ N(m, 1/(N·s)) of the posterior.

        The sample is a pure function of ``seed`` (and the state). On exit, also on an
        exception, the parameters hold what they held before: the mean again, exactly, or
        the enclosing block's sample when blocks nest. Not allowed in the middle of a step;
        no step can start inside the block.
        """
        seed = _check_seed(seed, allow_none=False)
        if self._phase != "at rest":
            self._expect("at rest", action="sampled_params")
        with torch.no_grad():
            if not self._posterior_seeds:
                self._prepare_state()
            self._posterior_seeds.append(seed)
        try:
            with torch.no_grad():
                self._draw_posterior(seed)
            yield
        finally:
            with torch.no_grad():
                self._posterior_seeds.pop()
                if self._posterior_seeds:
                    self._draw_posterior(self._posterior_seeds[-1])
                else:
                    _distributed.reshard(self.model)
                    self._restore(self._slots)
                    self._record_versions()

    def _draw_posterior(self, seed: int) -> None:
        _distributed.reshard(self.model)  # forward passes without backward came before (evaluations)
        for index, (group, slots) in enumerate(zip(self.param_groups, self._group_slots)):
            self._draw(group, slots, _philox.noise_seed(seed, index, _philox.POSTERIOR_STREAM, 0))


def _check_seed(seed: Any, *, allow_none: bool) -> int:
    """A seed: an integer in [0, 2^64) (numpy's included); None draws one from the operating system."""
    if seed is None and allow_none:
        return secrets.randbits(63)  # not torch's generator: the user's random streams stay as they are
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**64)" + (" or None" if allow_none else ""))
    return int(seed)
