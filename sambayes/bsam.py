"""bSAM: the Bayesian, Adam-like SAM of "SAM as an Optimal Relaxation of Bayes"."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import phases
from ._arguments import check_betas, check_number
from ._ledger import Slot, grads, offsets, params, states
from ._posterior import GaussianPosterior, check_seed, check_state_dtype
from ._step import Step, per_device
from .optimizer import Groups, TwoPassOptimizer


class BSAM(GaussianPosterior, TwoPassOptimizer):
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
        seed: the noise seed, an integer in [0, 2^64); None derives one from ``torch.initial_seed()``
            (which ``torch.manual_seed`` sets) and the number of optimizers this process built with
            ``seed=None`` under it before, so that a seeded script is reproducible run after run; nothing
            is drawn from torch's generator, whose streams the user's shuffling and dropout use. (To repeat
            a run within one process, pass the seed: ``opt.param_groups[0]["seed"]`` holds it.)
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
            it between replays. The same numbers as ``capturable=False`` (docs: CUDA graphs). Capturing a
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

    rest_key = "mean"
    rank0_hyperparameters = ("seed",)  # replicas share one noise seed, whatever each was given

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
        seed = check_seed(seed, allow_none=True)
        #: the dtype of ``precision`` and ``momentum``: None for the mean's, or torch.bfloat16
        self.state_dtype = check_state_dtype(state_dtype)
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

    def _check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            self._stored_dtype("precision", p)  # ValueError for a float64 parameter with bfloat16 state
        group["seed"] = check_seed(group["seed"], allow_none=True)
        check_number("num_data", group["num_data"], low_open=True)
        check_number("lr", group["lr"])
        check_betas(group["betas"])
        check_number("rho", group["rho"])
        check_number("weight_decay", group["weight_decay"])
        check_number("damping", group["damping"])
        check_number("init_precision", group["init_precision"], low_open=True)

    def _num_data(self, group: dict[str, Any]) -> float:
        return group["num_data"]

    def _initial_precision(self, group: dict[str, Any]) -> float:
        return group["init_precision"]

    # ---- phases -----------------------------------------------------------------------
    def _perturb(self, step: Step, groups: Groups) -> None:
        step.allocate("curvature_sum")  # the curvature sums live from the first ascent to the update
        for group, slots in groups:
            written = step.written_in(slots)
            curvature_sums = step.sum_of("curvature_sum", written)
            if step.split > 0:
                for s, curvature_sum in zip(written, curvature_sums):
                    if s not in step.ascended:  # its first gradient of this step came late: sum from 0
                        curvature_sum.zero_()
            if written:
                self._run(
                    phases.BSAM_PERTURB,
                    params(written),
                    grads(written),
                    states(written, "mean"),
                    states(written, "precision"),
                    curvature_sums,
                    found_inf=step.found_inf,
                    inv_scale=step.inv_scale,
                    rho=group["rho"],
                    accumulate=step.split > 0,
                )
            self._restore([s for s in slots if s not in step.written])

    def _updated(self, step: Step, slots: list[Slot]) -> list[Slot]:
        # the precision update needs this step's curvature estimate sqrt(s)·|g|
        return [s for s in step.with_grad(slots) if s in step.ascended]

    def _replica_statistics(self, step: Step) -> list[torch.Tensor]:
        # DDP averages the gradients, the curvature sums are averaged too; in parameter order, the same on every rank
        return [step.sums["curvature_sum"][s] for s in step.ledger.slots if s in step.ascended]

    def _update_group(self, step: Step, index: int, group: dict[str, Any], slots: list[Slot]) -> None:
        if not slots:
            return
        beta1, beta2 = group["betas"]
        self._run(
            phases.BSAM_UPDATE,
            params(slots),
            grads(slots),
            states(slots, "mean"),
            states(slots, "precision"),
            states(slots, "momentum"),
            step.sum_of("curvature_sum", slots),
            offsets(slots),  # element index: the rounding stream's counter
            found_inf=step.found_inf,
            inv_scale=step.inv_scale,
            lr=per_device(group["lr"], slots),
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            damping=group["damping"],
            splits=step.split,
            seed=self._rounding_seed(step, index, group, slots),  # bfloat16 state: its stream of this step
        )

    # ---- the posterior ----------------------------------------------------------------
    def sampled_params(self, seed: int = 0) -> contextlib.AbstractContextManager[None]:
        """Within the block the model holds one sample θ ~ N(m, 1/(N·s)) of the posterior.

        The sample is a pure function of ``seed`` (and the state). On exit, also on an
        exception, the parameters hold what they held before: the mean again, exactly, or
        the enclosing block's sample when blocks nest. Not allowed in the middle of a step;
        no step can start inside the block.
        """
        return self._posterior_sample(seed)
