"""``params.yaml`` as typed, validated config objects (one section per stage).

Every hyperparameter lives in ``params.yaml``; this module is its schema. Each field's docstring is its
documentation. A bad value is refused with one line naming the file, the key and the rule, e.g.
``params.yaml: collect.n_train_tasks must be >= 2 (got 0)``. A second file (``--params`` or the
``METADQN_PARAMS`` environment variable) can be overlaid on ``params.yaml`` for tests and quick runs; it is
merged key by key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from metadqn.errors import UserError
from metadqn.learners import METHODS, SELECTABLE

DEFAULT_PARAMS = Path("params.yaml")
PARAMS_ENV = "METADQN_PARAMS"
DASK_ADDRESS_ENV = "METADQN_DASK_ADDRESS"
OPERATIONAL = ("runner", "schedule")
"""Sections that say where and when the pipeline runs, never what it computes."""


class ParamsError(UserError, ValueError):
    """A user mistake in a params file; its message is one line, ready to print."""


class _Section(BaseModel):
    # no NaN or inf anywhere: a non-finite hyperparameter only ever produces NaN networks later
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, lt=2**63)]
"""A seed: numpy's SeedSequence and torch take any non-negative 64-bit integer."""
Width = Annotated[int, Field(ge=1, le=65_536)]
"""A layer width."""


class RangeOverride(_Section):
    train: list[tuple[float, float]] = Field(min_length=1)
    """Intervals R for train, validation and interpolation-test tasks."""
    extrap: list[tuple[float, float]] | None = Field(None, min_length=1)
    """Intervals E for extrapolation-test tasks (default: the same as train)."""

    @model_validator(mode="after")
    def _ordered(self) -> RangeOverride:
        for lo, hi in [*self.train, *(self.extrap or [])]:
            if lo > hi:
                raise ValueError(f"interval [{lo}, {hi}] has low > high")
            if lo <= 0:  # every physics parameter of every family is a positive length, mass, force or gravity
                raise ValueError(f"interval [{lo}, {hi}] must be positive (a physical length, mass, force or gravity)")
        return self


class FamilyConfig(_Section):
    name: str = "cartpole-mirrored"
    """Task family: cartpole, cartpole-mirrored, acrobot or mountaincar."""
    ranges: dict[str, RangeOverride] = Field(default_factory=dict)
    """Optional per-parameter range overrides, e.g. {gravity: {train: [[8, 12]]}}."""

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from metadqn.envs.families import FAMILIES

        if v not in FAMILIES:
            raise ValueError(f"must be one of {', '.join(FAMILIES)} (got {v!r})")
        return v

    @field_validator("ranges")
    @classmethod
    def _known_params(cls, v: dict[str, RangeOverride], info: ValidationInfo) -> dict[str, RangeOverride]:
        from metadqn.envs.families import FAMILIES

        name = info.data.get("name")
        if name is None:  # the name itself was refused; that error is reported instead
            return v
        specs = {p.name: p for p in FAMILIES[name].params}
        for key in v:
            if key not in specs:
                raise ValueError(f"has unknown parameter {key!r} for {name} (known: {', '.join(specs)})")
            if specs[key].discrete is not None:
                raise ValueError(f"{key} takes fixed values {specs[key].discrete}; it has no range to override")
        return v

    def family(self):
        """The :class:`~metadqn.envs.families.Family` with this config's range overrides applied."""
        from metadqn.envs.families import get_family

        return get_family(self.name).with_ranges(
            {k: v.model_dump(exclude_none=True) for k, v in self.ranges.items()}
        )


class DQNConfig(_Section):
    """DQN hyperparameters, shared by expert training (collect) and fine-tuning (meta-test)."""

    hidden_sizes: list[Width] = Field(default_factory=lambda: [64, 64], min_length=1, max_length=16)
    """Widths of the Q-network's hidden layers (ReLU MLP)."""
    total_steps: int = Field(50_000, ge=1, le=10**9)
    """Environment steps per task (summed over the task's parallel environments)."""
    envs_per_task: int = Field(8, ge=1, le=1024)
    """Parallel environments per task (gymnasium vector env)."""
    buffer_size: int = Field(50_000, ge=1, le=10**8)
    """Replay capacity per task, in transitions (rounded up to a multiple of envs_per_task)."""
    batch_size: int = Field(64, ge=1, le=65_536)
    """Transitions per task per gradient step."""
    learning_rate: float = Field(2.3e-3, gt=0, le=10)
    """Adam step size at the start."""
    learning_rate_end: float | None = Field(None, gt=0, le=10)
    """If set, the step size decays linearly to this value over total_steps (damps late oscillation)."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount factor."""
    learning_starts: int = Field(1_000, ge=0)
    """Environment steps per task before the first gradient step."""
    train_frequency: int = Field(256, ge=1)
    """Environment steps per task between bursts of gradient steps."""
    gradient_steps: int = Field(128, ge=1, le=100_000)
    """Gradient steps per burst (RL-Zoo's tuned CartPole DQN: 128 every 256 steps)."""
    target_update_interval: int = Field(128, ge=1)
    """Gradient steps between target-network updates (128 with the default burst = RL-Zoo's setting,
    whose SB3 target update every 10 env steps falls once between bursts of 128 gradient steps)."""
    tau: float = Field(1.0, gt=0, le=1)
    """Target update rate: 1.0 is a hard copy, smaller is Polyak averaging."""
    exploration_fraction: float = Field(0.16, ge=0, le=1)
    """Fraction of total_steps over which epsilon decays linearly."""
    epsilon_start: float = Field(1.0, ge=0, le=1)
    """Initial exploration rate."""
    epsilon_end: float = Field(0.04, ge=0, le=1)
    """Final exploration rate."""
    double_dqn: bool = True
    """Select next actions with the online network, evaluate them with the target (van Hasselt 2016)."""
    max_grad_norm: float = Field(10.0, gt=0)
    """Per-task gradient-norm clip."""
    eval_interval: int = Field(2_500, ge=1)
    """Environment steps per task between greedy evaluations (learning-curve points)."""
    eval_episodes: int = Field(10, ge=1, le=10_000)
    """Greedy episodes per evaluation."""
    early_stop_return: float | None = None
    """Stop training a task once a greedy evaluation reaches this return (null: never)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where to train: cpu, cuda, or auto (cuda when present)."""
    torch_threads: int = Field(2, ge=1, le=1024)
    """torch intra-op threads of a stage process (meta_train's learners, and any run of ``runner.kind:
    local``); worker processes take ``runner.threads``. A count from params, never the machine's core count:
    a reduction split over another number of threads adds in another order (MKL's reproducible mode holds
    for a fixed count only), so the same value gives the same bytes on any machine (``metadqn.determinism``)."""


class CollectConfig(_Section):
    """The collect stage: task sets, expert training and the trajectory dataset."""

    task_seed: Seed = 0
    """Seed of the task sampler (task parameters per split)."""
    seed: Seed = 0
    """Seed of expert training and data collection."""
    n_train_tasks: int = Field(32, ge=2)
    """Training tasks (meta-training reads only these)."""
    n_val_tasks: int = Field(8, ge=1)
    """Validation tasks (model selection in meta-training)."""
    n_interp_tasks: int = Field(8, ge=1)
    """Interpolation-test tasks (parameters from the training ranges R)."""
    n_extrap_tasks: int = Field(8, ge=0)
    """Extrapolation-test tasks (parameters from the ranges E)."""
    n_val_extrap_tasks: int = Field(0, ge=0)
    """Out-of-range validation tasks (split ``val_extrap``, parameters from the ranges E, drawn apart from
    the test tasks). Like the validation tasks they only select (hypernet checkpoints, fine-tuning
    configurations) and are never trained on; every selection then weighs the two validation splits
    equally. 0: every selection sees in-range tasks only, so nothing chosen can favour what works out of
    range. Read the extrapolation figures knowing which: with it, E's ranges were seen by selection."""
    max_rounds: int = Field(3, ge=1)
    """Training rounds per expert: a task whose expert is not solved after a round is trained again from a
    new seed (DQN on CartPole is unstable; a restart is cheaper than a longer run for every task)."""
    group_size: int = Field(64, ge=1)
    """Tasks trained together in one batched trainer (one Prefect task; one Dask task when scaled out)."""
    exploration_steps: int = Field(1_000, ge=0)
    """Transitions per task under the uniform-random policy (source 'exploration')."""
    expert_steps: int = Field(2_000, ge=0)
    """Transitions per task from the expert's epsilon-greedy policy (source 'expert')."""
    expert_epsilon: float = Field(0.05, ge=0, le=1)
    """Exploration rate of the expert rollouts, so that the data covers a little off-policy."""
    replay_rows: int = Field(4_000, ge=0)
    """Most recent transitions per task kept from the expert's replay buffer (source 'replay')."""
    rollout_envs_per_task: int = Field(4, ge=1)
    """Parallel environments per task for the exploration and expert rollouts."""
    random_episodes: int = Field(100, ge=1, le=100_000)
    """Episodes of the uniform-random policy per task whose mean return is the task's 0 on the normalised
    scale (:mod:`metadqn.data.normalise`). More than ``dqn.eval_episodes``: a random policy's return varies
    far more than an expert's, and this figure enters every normalised return of the task."""

    def counts(self) -> dict[str, int]:
        return {"train": self.n_train_tasks, "val": self.n_val_tasks,
                "interp": self.n_interp_tasks, "extrap": self.n_extrap_tasks, "val_extrap": self.n_val_extrap_tasks}


class HypernetConfig(_Section):
    """Model-based learner: context encoder + hypernetwork generating every QNetwork parameter."""

    hidden: int = Field(256, ge=8)
    """Width of the hypernetwork's two hidden layers."""
    iterations: int = Field(3000, ge=1)
    """Gradient steps (each over every training task)."""
    learning_rate: float = Field(1e-3, gt=0)
    """Adam step size."""
    batch_states: int = Field(128, ge=1)
    """States per task per step for distillation."""
    batch_transitions: int = Field(64, ge=1)
    """Transitions per task per step for the TD loss."""
    kl_weight: float = Field(1.0, ge=0)
    """Weight of the policy-distillation KL(softmax(Q_expert/T) || softmax(Q_generated/T)) (Rusu et al. 2016)."""
    kl_temperature: float = Field(0.01, gt=0)
    """T of the distillation softmax; small because the experts' action gaps are small (~0.07 on Q ~ 67)."""
    q_weight: float = Field(0.01, ge=0)
    """Weight of a Huber loss between generated and expert Q-values (pulls their scale towards the
    experts'; keep it small, see ``distillation_losses``)."""
    td_weight: float = Field(0.1, ge=0)
    """Weight of the TD loss through the generated parameters."""
    target_tau: float = Field(0.005, gt=0, le=1)
    """Polyak rate of the slowly updated copy that gives TD targets."""
    dagger_interval: int = Field(250, ge=1)
    """Steps between DAgger rounds: roll out the generated policies, label the visited states by the expert."""
    dagger_steps: int = Field(256, ge=0)
    """Environment steps per task per DAgger round (0 turns DAgger off)."""
    dagger_epsilon: float = Field(0.1, ge=0, le=1)
    """Exploration of the DAgger rollouts."""
    dagger_capacity: int = Field(4000, ge=1)
    """DAgger states kept per task (oldest dropped first)."""
    eval_interval: int = Field(250, ge=1)
    """Steps between zero-shot evaluations on the validation tasks (checkpoint selection)."""
    n_seeds: int = Field(3, ge=1)
    """Independent trainings; the one with the best validation zero-shot return is kept."""
    oracle: bool = True
    """Also train hypernet-oracle (fed the true physics) as an analysis reference."""
    oracle_seeds: int = Field(1, ge=1)
    """Seeds of hypernet-oracle (an analysis reference, so one by default)."""
    teacher: Literal["own", "robust", "local"] = "own"
    """Which expert the generated network of each training task imitates
    (:func:`metadqn.meta.hypernet.teacher_indices`): ``own``, the task's own expert; ``robust``, among the
    experts that do about as well on the task (within ``teacher_tolerance`` of its best cross-evaluation
    score), the one that does best over the training and validation tasks, each split weighing the same;
    ``local``, the same but each task weighted by how well the task's own expert does on it (broad among
    the tasks like this one, not across the whole family)."""
    teacher_tolerance: float = Field(0.05, ge=0, le=1)
    """``robust`` and ``local``: how far below the best normalised cross-evaluation score on a task an
    expert may fall and still teach it."""
    gate: Literal["off", "validated", "on"] = "validated"
    """The out-of-range gate (:meth:`metadqn.meta.hypernet.HyperQ.set_gate`): a task whose embedding lies
    outside the training tasks' gets the nearest training task's embedding. ``validated``: kept only if it
    raises the validation zero-shot (each validation split weighing the same; it can fire only on tasks
    out of the training region, so it needs ``collect.n_val_extrap_tasks`` to ever be kept)."""


class SiameseConfig(_Section):
    """Metric-based learner: a Siamese context encoder whose distance predicts expert transfer."""

    target: Literal["cross_eval", "physics"] = "cross_eval"
    """Regress the distance on 1 - the symmetrised cross-evaluation score, or on physics distance."""
    iterations: int = Field(1500, ge=1)
    """Gradient steps (each over every pair of training tasks)."""
    learning_rate: float = Field(1e-3, gt=0)
    """Adam step size."""
    k: int = Field(1, ge=1)
    """Neighbours used at meta-test: 1 starts from the nearest expert, more averages their parameters."""
    index_contexts: int = Field(8, ge=1)
    """Random contexts averaged into each training task's index embedding."""
    rerank: int = Field(0, ge=0, le=1000)
    """0: the start is the nearest expert (or the k-average). n >= 2: the start is whichever of the n nearest
    experts scores best under the model score (``meta_train.model_score``): its greedy policy simulated in
    a linear model of the task's dynamics fitted to the context, the score select uses. Out of range the
    nearest embedding is often not the best expert; the context's transitions tell them apart."""

    @model_validator(mode="after")
    def _one_rule(self) -> SiameseConfig:
        if self.rerank == 1:
            raise ValueError("rerank must be 0 (off) or at least 2 (1 is the nearest expert: use 0)")
        if self.rerank and self.k > 1:
            raise ValueError(f"k {self.k} averages the nearest experts and rerank {self.rerank} picks one of them:"
                             " set k to 1 or rerank to 0")
        return self


class ReptileConfig(_Section):
    """Optimisation-based learner: Reptile (Nichol et al. 2018) over DQN, every training task batched."""

    inner_loop: Literal["online", "offline"] = "online"
    """online: each inner loop is a short online DQN run (the dqn section's settings) from the current
    initialisation on every training task, i.e. the fine-tuning the initialisation is meant for; offline:
    TD steps on each task's stored transitions (the first version; it learned slower than scratch)."""
    meta_iterations: int = Field(300, ge=1)
    """Outer steps; each runs the inner loop on every training task at once (batched)."""
    inner_env_steps: int = Field(2000, ge=1)
    """online: environment steps per task of each inner DQN run (must exceed dqn.learning_starts)."""
    inner_steps: int = Field(32, ge=1)
    """offline: TD steps per task per outer step, on the task's stored transitions."""
    inner_learning_rate: float = Field(1e-3, gt=0)
    """offline: Adam step size of the inner loop (fresh Adam state every outer step)."""
    outer_step: float = Field(0.5, gt=0, le=1)
    """Reptile's epsilon at the start; it decays linearly to 0."""
    batch_size: int = Field(64, ge=1)
    """offline: transitions per task per inner step."""


class MultitaskConfig(_Section):
    """Baseline: one DQN trained online on all training tasks at once, without task information."""

    total_steps: int = Field(60_000, ge=1)
    """Environment steps, summed over one environment per training task (domain randomisation)."""


class ModelScoreConfig(_Section):
    """The model score (:class:`metadqn.meta.dynamics.ModelScore`): a candidate start's greedy policy simulated
    in a linear model of the task's dynamics fitted to its context. Used by select (``select.score: model``)
    and by siamese's re-ranking (``siamese.rerank``)."""

    starts: int = Field(8, ge=1, le=1000)
    """How many start states (draws of the family's reset distribution) each policy is simulated from; the
    score is the mean over them."""
    ridge: float = Field(1e-3, gt=0.0, le=1e3)
    """The ridge term of the least-squares fit of the dynamics (it keeps the fit solvable when a context
    never moves one coordinate)."""


SelectCandidate = Literal["hypernet", "siamese", "multitask", "reptile"]
_DEFAULT_CANDIDATES: list[SelectCandidate] = ["hypernet", "siamese", "multitask"]


class SelectConfig(_Section):
    """A start chosen from the context: the candidate start that scores best on the task's context (``score``;
    :mod:`metadqn.meta.select`). It fits nothing; it is built from the other learners' models."""

    candidates: list[SelectCandidate] = Field(default_factory=lambda: _DEFAULT_CANDIDATES.copy(), min_length=1)
    """Whose starts compete (each must be in ``meta_train.learners``): the hypernet's generated network,
    the siamese index's ``k`` nearest experts, the multitask or reptile network."""
    k: int = Field(3, ge=1)
    """How many of the siamese index's nearest experts are candidates (each one on its own)."""
    score: Literal["squared", "relative", "model"] = "model"
    """How a candidate is scored on the task's context, lowest wins: ``model``, how far its greedy policy's
    return, simulated in a linear model of the task's dynamics fitted to the context, falls short of the
    model's best (:mod:`metadqn.meta.dynamics`); ``squared``, its mean squared one-step TD error on the
    context; ``relative``, that over the mean square of its Q(s, a) (scale-free). ``model`` (its settings:
    ``meta_train.model_score``) asks what a
    start would *do* on the task, the TD error only whether its values are self-consistent there (README,
    "A start chosen from the context")."""
    margins: list[float] = Field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 1e6], min_length=1)
    """The first candidate (the hypernet's, when listed) is chosen unless another's score is lower than its
    own divided by the margin; the meta_train stage keeps the margin with the best validation zero-shot
    (ties: the earlier in this list). 1 is the plain lowest-score rule; a huge margin trusts the first
    candidate whatever the scores. Why: the TD error ranks a real expert above a generated network whose
    policy is as good, and validation can tell how much to discount it. With the ``model`` score a start
    that lasts the whole simulated episode scores 0 and no margin displaces it; validation keeps 1."""

    @field_validator("margins")
    @classmethod
    def _at_least_one(cls, v: list[float]) -> list[float]:
        if any(not m >= 1.0 for m in v):  # NaN fails too
            raise ValueError(f"every margin must be >= 1 (1: no preference for the first candidate): {v}")
        return v

    @field_validator("candidates")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a candidate twice: {v}")
        return v


EffectLearner = Literal["hypernet", "siamese"]
_EFFECT_DEFAULT: list[EffectLearner] = ["hypernet"]


class MetaTrainConfig(_Section):
    """The meta_train stage."""

    seed: Seed = 0
    """Seed of every meta-learner."""
    learners: list[str] = Field(default_factory=lambda: list(SELECTABLE), min_length=1)
    """Which learners to train (names from :data:`metadqn.learners.LEARNERS`; ``hypernet-oracle`` comes with
    ``hypernet``, see ``hypernet.oracle``)."""
    context_size: int = Field(64, ge=1)
    """C: transitions in a task's context (uniform-random policy)."""
    encoder: Literal["deepset", "gru"] = "deepset"
    """Context encoder: permutation-invariant mean-pooled MLP, or a GRU over the transition sequence."""
    features: Literal["inferred", "oracle"] = "inferred"
    """Task features of the main hypernet: inferred from the context, or the true physics (analysis only)."""
    action_effect: list[EffectLearner] = Field(default_factory=lambda: _EFFECT_DEFAULT.copy())
    """The learners whose context encoder also reads each action's mean effect on the state change, as a
    unit direction plus its clipped log-size (:class:`metadqn.meta.context.ActionEffect`); [] for none."""
    embed_dim: int = Field(32, ge=1)
    """Task embedding size."""
    encoder_hidden: int = Field(128, ge=4)
    """Encoder width."""
    eval_episodes: int = Field(10, ge=1)
    """Greedy episodes per validation task when selecting and reporting."""
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)
    siamese: SiameseConfig = Field(default_factory=SiameseConfig)
    reptile: ReptileConfig = Field(default_factory=ReptileConfig)
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    model_score: ModelScoreConfig = Field(default_factory=ModelScoreConfig)

    @field_validator("learners")
    @classmethod
    def _known_learners(cls, v: list[str]) -> list[str]:
        return _check_names(v, SELECTABLE, "learner")


def _check_names(v: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    unknown = [n for n in v if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})")
    return v


FROZEN_SUFFIX = "-frozen"
"""A meta-learned method's frozen-start control is reported as ``<method>-frozen``."""


def _check_dqn_overrides(v: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(v) - set(DQNConfig.model_fields))
    if unknown:
        raise ValueError(f"has unknown dqn key(s) {', '.join(unknown)}")
    fixed = sorted({"total_steps", "eval_interval", "eval_episodes"} & set(v))
    if fixed:
        raise ValueError(f"must not set {', '.join(fixed)} (they come from meta_test itself)")
    try:  # a bad value fails here, at load time, not in a stage
        DQNConfig.model_validate({**DQNConfig().model_dump(), **v})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(_format_error(err, "").removeprefix(": ")) from None
    return v


class FinetuneConfig(_Section):
    """How DQN fine-tunes from a given start network (every lever off: plain DQN with the dqn section).

    The levers answer the known ways a converged value network collapses when it is fine-tuned online
    (Wolczyk et al. 2024): exploration that throws the start's policy away, large early steps, nothing
    holding the network near its start, and a replay that forgets the start's good data.
    """

    dqn: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the dqn section (e.g. learning_rate, gradient_steps, tau); total_steps and evaluation
    come from meta_test itself."""
    start_epsilon: float | None = Field(None, ge=0, le=1)
    """(a) Act epsilon-greedily around the current network with this constant epsilon from step 0 (the
    start's own policy at first) instead of the dqn epsilon schedule, so learning_starts fills the replay
    with the start's rollouts, not uniform-random ones (WSRL, JSRL). null: the dqn schedule."""
    lr_warmup_steps: int = Field(0, ge=0)
    """(b) Environment steps over which the Adam step size rises linearly from 0 (damped early optimisation)."""
    anchor: Literal["none", "kl", "l2"] = "none"
    """(c) A loss that holds the network near its frozen start: kl distils the start's policy
    (KL(softmax(Q_start/T) || softmax(Q/T)) on the batch states; kickstarting, QDagger); l2 is the squared
    distance of the parameters to the start's."""
    anchor_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of the anchor at step 0."""
    anchor_floor: float = Field(0.0, ge=0, allow_inf_nan=False)
    """The weight never decays below this (the start stays a teacher when it is already as good as one)."""
    anchor_decay_steps: int = Field(0, ge=0)
    """Environment steps over which the weight decays linearly from anchor_weight to anchor_floor (0: constant
    anchor_weight)."""
    anchor_temperature: float = Field(0.01, gt=0, allow_inf_nan=False)
    """T of the kl anchor's softmax (small: CartPole's action gaps are small next to its Q-values)."""
    protected_steps: int = Field(0, ge=0)
    """(d) The first this many environment steps' transitions (the start's own rollouts) are kept in a
    protected replay partition that is never overwritten (DQfD, RLPD)."""
    protected_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of every batch drawn from the protected partition (once it holds data)."""
    shrink: float = Field(1.0, ge=0, le=1)
    """Shrink-and-perturb (Ash & Adams 2020): start from shrink x start + (1 - shrink) x a fresh network;
    1 keeps the start, 0 is scratch. For starts that learn slower than a fresh network."""
    start_check: float | None = Field(None, gt=0, le=1)
    """(e) Keep the start only where it looks good on the task itself: where its greedy policy, simulated in
    the linear model of the task's dynamics fitted to the context (the model score, meta_train.model_score),
    gets at least this fraction of the best return of that model (CartPole: lasts this fraction of the
    episode limit). Elsewhere the start is discarded and the run is scratch's on the same slot (a fresh
    network with the dqn section), so a start that is wrong about a task cannot hold fine-tuning below
    scratch. It costs no environment step (the context is every method's anyway). null: always kept."""

    @field_validator("dqn")
    @classmethod
    def _dqn_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_dqn_overrides(v)

    @model_validator(mode="after")
    def _coherent(self) -> FinetuneConfig:
        if (self.protected_steps > 0) != (self.protected_fraction > 0):
            raise ValueError("protected_steps and protected_fraction must both be set (or both 0)")
        if self.anchor_decay_steps and self.anchor_floor > self.anchor_weight:
            raise ValueError("anchor_floor must not exceed anchor_weight")
        return self


class SearchConfig(_Section):
    """The fine-tuning configuration search (stage finetune_search), on validation tasks only."""

    seeds: int = Field(2, ge=1)
    """Fine-tuning runs per (validation task, method, candidate)."""
    seed: Seed = 0
    """Seed of the search's contexts and runs (independent of meta_test.seed)."""
    candidates: dict[str, FinetuneConfig] = Field(default_factory=lambda: {"dqn": FinetuneConfig()}, min_length=1)
    """Named fine-tuning configurations tried for every meta-learned method; the one with the highest
    validation AUC IQM is selected (ties: a candidate that keeps nothing of the start, ``shrink: 0`` alone,
    then the first listed). Scratch is never searched: it keeps the dqn section, which is tuned for learning
    from scratch."""
    guard_final: bool = True
    """Do no harm at the end of the budget: a candidate whose final return on the validation tasks is below
    scratch's (the IQM of the paired per-(task, seed) differences below 0) is not selected, whatever its AUC
    (:mod:`metadqn.evaluation.search`). false: the AUC score alone."""


class MetaTestConfig(_Section):
    """The meta_test stage: fine-tuning every method on every held-out task, from equal budgets."""

    seed: Seed = 0
    """Seed of contexts and fine-tuning runs."""
    seeds: int = Field(5, ge=1)
    """Fine-tuning runs per (task, method)."""
    methods: list[str] = Field(default_factory=lambda: list(METHODS), min_length=1)
    """Methods to compare (a meta-learned one is skipped, with a warning, if meta_train did not produce it)."""
    budget_steps: int = Field(20_000, ge=1)
    """T: environment steps per run, the context's C transitions included (equal for every method)."""
    eval_interval: int = Field(1_000, ge=1)
    """t: environment steps between greedy evaluations (learning-curve points)."""
    eval_episodes: int = Field(10, ge=1)
    """Greedy episodes per evaluation."""
    threshold: float = Field(0.9, gt=0)
    """Steps to threshold: first evaluation with return >= threshold x the task's expert return."""
    bootstrap_resamples: int = Field(2000, ge=100)
    """Stratified-bootstrap resamples for the confidence intervals."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Confidence level of the intervals."""
    frozen_controls: bool = True
    """Report each meta-learned start without fine-tuning as ``<method>-frozen`` (the "do nothing" curve)."""
    search: SearchConfig = Field(default_factory=SearchConfig)
    """Fine-tuning configurations tried per meta-learned method on validation tasks."""

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        return _check_names(v, METHODS, "method")

    @model_validator(mode="after")
    def _fallback_needs_scratch(self) -> MetaTestConfig:
        checked = [name for name, ft in self.search.candidates.items() if ft.start_check is not None]
        if checked and "scratch" not in self.methods:
            raise ValueError(f"search candidate {checked[0]!r} has a start_check, whose fallback is scratch's run: "
                             "add scratch to methods (or drop the start_check)")
        return self

    def dqn(self, base: DQNConfig, context_steps: int, finetune: FinetuneConfig | None = None) -> DQNConfig:
        """A fine-tuning run's DQN config: ``base`` with the candidate's overrides, and the budget (T minus the
        context's C steps) and evaluation of this section."""
        over = finetune.dqn if finetune is not None else {}
        return DQNConfig.model_validate({**base.model_dump(), **over,
                                         "total_steps": self.budget_steps - context_steps,
                                         "eval_interval": self.eval_interval, "eval_episodes": self.eval_episodes})


class ReportConfig(_Section):
    """The report stage."""

    title: str = "metadqn meta-test report"
    """Heading of reports/report.html and reports/report.md."""


class RegistryConfig(_Section):
    """MLflow model registry: what is registered after a pipeline run, and the promotion rule."""

    metric: Literal["interp.zero_shot", "interp.auc", "interp.final",
                    "extrap.zero_shot", "extrap.auc", "extrap.final"] = "interp.zero_shot"
    """``<split>.<metric>`` from reports/metrics.json that promotion compares (its _iqm and _ci_high): only
    figures where higher is better (zero-shot return, normalised AUC, final return); regret and steps to
    threshold are lower-is-better and refused."""
    rule: Literal["above_ci_high", "above_iqm"] = "above_ci_high"
    """Promote when the challenger's IQM is above the champion's upper CI bound (or simply its IQM)."""
    floor: float | None = None
    """The bar a challenger's IQM on ``metric`` must clear to be promoted at all. Unset (default): the
    no-meta-learning baseline, scratch's upper CI bound on ``metric`` in the same metrics.json."""
    qnet_method: str = "hypernet"
    """Whose adapted Q-networks (seed 0, one per test task) are registered as metadqn-<family>-qnet (a
    meta_test method: a learner or scratch)."""

    @field_validator("qnet_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)} (got {v!r})")
        return v

    @field_validator("floor")
    @classmethod
    def _finite_floor(cls, v: float | None) -> float | None:
        if v is not None and not abs(v) < float("inf"):  # NaN fails this comparison too
            raise ValueError(f"must be a finite number (got {v!r})")
        return v


class RunnerConfig(_Section):
    """Where the fan-out of the collect, finetune_search and meta_test stages runs (never changes a result;
    see flows/runners.py)."""

    kind: Literal["processes", "local", "dask"] = "processes"
    """processes: a pool of ``workers`` processes of ``threads`` torch threads each, started by the stage;
    local: one group after another in the stage process; dask: Prefect's DaskTaskRunner on a Dask cluster."""
    workers: int = Field(2, ge=1, le=256)
    """Worker processes when kind is processes: the number of groups trained at once. Set it to the cores
    you want the stage to use (a stage has at most a handful of groups; more workers than groups idle)."""
    threads: int = Field(1, ge=1, le=256)
    """torch threads per worker process when kind is processes. 1 keeps a stage's speed when other programs
    share the machine (a process of several OpenMP threads stalls whenever one of them is descheduled)."""
    address: str | None = None
    """Scheduler address of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 ($METADQN_DASK_ADDRESS
    overrides it). Required when kind is dask."""

    @model_validator(mode="after")
    def _address_for_dask(self) -> RunnerConfig:
        if self.kind == "dask" and not (self.address or os.environ.get(DASK_ADDRESS_ENV)):
            raise ValueError(f"runner.address is required when runner.kind is dask (or set ${DASK_ADDRESS_ENV})")
        if self.address is not None:
            _check_dask_address(self.address, "runner.address")
        if self.kind == "dask" and os.environ.get(DASK_ADDRESS_ENV):
            _check_dask_address(os.environ[DASK_ADDRESS_ENV], f"${DASK_ADDRESS_ENV}")
        return self

    def dask_address(self) -> str | None:
        return os.environ.get(DASK_ADDRESS_ENV) or self.address


_DASK_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")


def _check_dask_address(address: str, what: str) -> None:
    """A Dask scheduler address is ``scheme://host:port``; anything else fails only when a stage connects."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        port = None
        parts = urlsplit("")
    if parts.scheme not in _DASK_SCHEMES or not parts.hostname or (parts.scheme != "inproc" and port is None):
        raise ValueError(f"{what} must look like tcp://HOST:PORT (schemes: {', '.join(_DASK_SCHEMES)}; "
                         f"got {address!r})")


class ScheduleConfig(_Section):
    """Scheduled pipeline runs (``metadqn serve``): grow the task pool, run, register, promote, record."""

    cron: str = "0 3 * * *"
    """Default cron schedule of ``metadqn serve`` (``--cron`` overrides it)."""
    timezone: str = "UTC"
    """Time zone the cron expression is read in."""
    grow_tasks: int = Field(2, ge=0)
    """New training tasks appended to the task pool by each scheduled run (0: run on the pool as it is)."""
    record: bool = True
    """After a scheduled run: ``dvc push`` and a git commit of dvc.lock, the pool's .dvc file and the
    git-tracked reports (manual ``metadqn pipeline`` runs record only with ``--record``)."""
    branch: str = Field("metadqn-scheduled", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")
    """The branch scheduled runs commit to; the serving checkout must be on it (a dedicated clone)."""
    push: bool = True
    """Push data and models to the default DVC remote before committing (so every commit can be pulled)."""
    deployment: str = Field("metadqn-scheduled", min_length=1)
    """Name of the Prefect deployment that ``metadqn serve`` creates."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"must be an IANA time zone such as UTC or Europe/Paris (got {v!r})") from None
        return v

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from prefect.schedules import Cron  # the parser `metadqn serve` will use

        try:
            Cron(v)
        except ValueError:
            raise ValueError(f"must be a five-field cron expression such as '0 3 * * *' (got {v!r})") from None
        return v


class TrackingConfig(_Section):
    enabled: bool = True
    """Log runs to MLflow (URI from MLFLOW_TRACKING_URI, default sqlite:///mlflow.db, artifacts in mlruns/)."""


class Params(BaseModel):
    """The whole ``params.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    family: FamilyConfig = Field(default_factory=FamilyConfig)
    collect: CollectConfig = Field(default_factory=CollectConfig)
    dqn_presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-family DQN settings, keyed by family name (RL-Zoo's tuned settings per environment are the
    reference). The ``dqn`` section in effect is the preset of ``family.name`` updated by the keys set under
    ``dqn``, so switching ``family.name`` switches the DQN settings, and a key under ``dqn`` overrides it
    for every family. A family without a preset uses ``dqn`` and the schema defaults alone."""
    dqn: DQNConfig = Field(default_factory=DQNConfig)
    meta_train: MetaTrainConfig = Field(default_factory=MetaTrainConfig)
    meta_test: MetaTestConfig = Field(default_factory=MetaTestConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Merges ``dqn_presets[family.name]`` under the ``dqn`` section (each preset checked on its own first,
        so a bad preset value is reported under its own key, whichever family is selected)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("dqn_presets"), Mapping):
            return data
        from metadqn.envs.families import FAMILIES

        presets = data["dqn_presets"]
        for name, preset in presets.items():
            if name not in FAMILIES:
                raise ValueError(f"dqn_presets has unknown family {name!r} (known: {', '.join(FAMILIES)})")
            if not isinstance(preset, Mapping):
                raise ValueError(f"dqn_presets.{name} must be a mapping of dqn keys (got {_short(preset)})")
            try:
                DQNConfig.model_validate(preset)
            except ValidationError as exc:
                raise ValueError(_format_error(exc.errors()[0], f"dqn_presets.{name}")) from None
        family = data.get("family")
        name = family.get("name", FamilyConfig().name) if isinstance(family, Mapping) else FamilyConfig().name
        own = data.get("dqn")
        # a malformed name (a list, a number) is left to the family section's own one-line error
        if isinstance(name, str) and name in presets and (own is None or isinstance(own, Mapping)):
            data = {**data, "dqn": {**presets[name], **(own or {})}}
        return data

    @model_validator(mode="after")
    def _coherent(self) -> Params:
        """Cross-section rules: every value that would fail or silently do nothing in a stage is refused here."""
        _check_sizes(self.model_dump(), "")
        c, t = self.meta_train.context_size, self.meta_test.budget_steps
        if t <= c:
            raise ValueError(f"meta_test.budget_steps must exceed meta_train.context_size ({c}) (got {t})")
        dqn = self.dqn
        if dqn.learning_starts >= dqn.total_steps:
            raise ValueError(f"dqn.learning_starts must be below dqn.total_steps ({dqn.total_steps}) or no expert "
                             f"ever trains (got {dqn.learning_starts})")
        for name, cand in self.meta_test.search.candidates.items():
            tuned = self.meta_test.dqn(dqn, c, cand)  # the fine-tuning config is built here, at load time
            if tuned.learning_starts >= tuned.total_steps:
                raise ValueError(f"meta_test.search.candidates.{name}: learning_starts ({tuned.learning_starts}) must "
                                 f"be below the fine-tuning budget ({tuned.total_steps} steps) or nothing fine-tunes")
        rep = self.meta_train.reptile
        if "reptile" in self.meta_train.learners and rep.inner_loop == "online" \
                and rep.inner_env_steps <= dqn.learning_starts:
            raise ValueError(f"meta_train.reptile.inner_env_steps must exceed dqn.learning_starts "
                             f"({dqn.learning_starts}) or the inner loop never learns (got {rep.inner_env_steps})")
        if "select" in self.meta_train.learners:
            missing = [c for c in self.meta_train.select.candidates if c not in self.meta_train.learners]
            if missing:
                raise ValueError(f"meta_train.select.candidates lists {', '.join(missing)}, which meta_train.learners "
                                 "does not train: add it to the learners or drop it from the candidates")
            if "hypernet" in self.meta_train.select.candidates and self.meta_train.features == "oracle":
                raise ValueError("meta_train.select.candidates lists hypernet, but meta_train.features: oracle "
                                 "trains the physics-fed hypernet, which a new task's context cannot feed")
        mt_steps = self.meta_train.multitask.total_steps
        if "multitask" in self.meta_train.learners and mt_steps <= dqn.learning_starts:
            raise ValueError(f"meta_train.multitask.total_steps must exceed dqn.learning_starts "
                             f"({dqn.learning_starts}) or the multitask DQN never learns (got {mt_steps})")
        _check_replay_memory(self)
        return self

    def warnings(self) -> list[str]:
        """Legal settings that are probably not what was meant (printed by the CLI, never fatal)."""
        out = []
        d = self.dqn
        if d.epsilon_end > d.epsilon_start:
            out.append(f"dqn.epsilon_end ({d.epsilon_end}) is above dqn.epsilon_start ({d.epsilon_start}): "
                       "exploration grows during training")
        learned = set(self.meta_train.learners) | ({"hypernet-oracle"} if "hypernet" in self.meta_train.learners
                                                     and self.meta_train.hypernet.oracle else set())
        from metadqn.learners import LEARNERS

        skipped = [m for m in self.meta_test.methods if m in LEARNERS and m not in learned]
        if skipped:
            out.append(f"meta_test.methods lists {', '.join(skipped)}, which meta_train.learners does not train: "
                       "they will be skipped")
        if d.eval_interval > d.total_steps:
            out.append(f"dqn.eval_interval ({d.eval_interval}) exceeds dqn.total_steps ({d.total_steps}): expert "
                       "curves have only their first and last points")
        budget = self.meta_test.budget_steps - self.meta_train.context_size
        if self.meta_test.eval_interval > budget:
            out.append(f"meta_test.eval_interval ({self.meta_test.eval_interval}) exceeds the fine-tuning budget "
                       f"({budget}): learning curves have only their first and last points")
        hn = self.meta_train.hypernet
        if "hypernet" in self.meta_train.learners and hn.eval_interval > hn.iterations:
            out.append(f"meta_train.hypernet.eval_interval ({hn.eval_interval}) exceeds its iterations "
                       f"({hn.iterations}): only the last step is evaluated")
        return out

    def digest(self) -> str:
        """A short, stable hash of every value that can change a result (recorded with each run and model
        version); where and when the pipeline runs (runner, schedule) is left out."""
        # the dqn section in effect is in; the other families' presets change nothing of this run
        blob = json.dumps(self.model_dump(mode="json", exclude={*OPERATIONAL, "dqn_presets"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, for MLflow params."""
        return _flatten(self.model_dump(mode="json", exclude={"dqn_presets"}))  # dqn holds the preset in effect


MAX_INT = 10**9
"""No count or size in params is meant to be this large; larger ones would only exhaust memory or time."""


def _check_sizes(d: Mapping[str, Any], prefix: str) -> None:
    for k, v in d.items():
        if isinstance(v, Mapping):
            _check_sizes(v, f"{prefix}{k}.")
        elif isinstance(v, int) and not isinstance(v, bool) and v > MAX_INT and not k.endswith("seed"):
            raise ValueError(f"{prefix}{k} must be <= {MAX_INT:.0e} (got {v})")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return 2**62


def _check_replay_memory(p: Params) -> None:
    """The replay buffers trained at once (one float32 row of obs, next obs, action, reward, done and weight per
    transition, for every task slot of a batched trainer, times the worker processes running trainers side by
    side) must fit in this machine's memory. The largest batched trainer is collect's group, meta_train's
    reptile/multitask (every training task), a meta_test method (test tasks x seeds) or a finetune_search run
    (at most every candidate x meta-learned method x seed x validation task)."""
    obs_dim = p.family.family().obs_dim
    c, mt = p.collect, p.meta_test
    learned = max(len(p.meta_train.learners) + 1, 1)  # + hypernet-oracle
    slots = max(min(c.group_size, sum(c.counts().values())), c.n_train_tasks,
                (c.n_interp_tasks + c.n_extrap_tasks) * mt.seeds,
                (len(mt.search.candidates) * learned + 1) * mt.search.seeds * (c.n_val_tasks + c.n_val_extrap_tasks))
    buffer = max([p.dqn.buffer_size, *(int(f.dqn.get("buffer_size", 0)) for f in mt.search.candidates.values())])
    workers = p.runner.workers if p.runner.kind == "processes" else 1
    need = buffer * (2 * obs_dim + 4) * 4 * slots * workers
    have = _physical_memory()
    if need > have:
        raise ValueError(f"dqn.buffer_size ({buffer}) x {slots} tasks per batched trainer x {workers} worker(s) "
                         f"needs {need / 2**30:.1f} GiB of replay, more than this machine's {have / 2**30:.1f} GiB; "
                         "lower dqn.buffer_size, collect.group_size, the test seeds or runner.workers")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML lets the last
    one win silently, so a duplicated section would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key (a list as a key): refused below by PyYAML itself
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_PARAMS_BYTES = 1_000_000
"""A params file is a few kilobytes; anything this large is the wrong file."""


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise ParamsError(f"{path}: is a directory, not a params file")
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the project root, or pass --params PATH)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: {len(raw)} bytes is too large for a params file (at most {MAX_PARAMS_BYTES})")
    if b"\x00" in raw:  # UTF-16/32 or a binary file
        raise ParamsError(f"{path}: not a text file (binary, or UTF-16/32 encoded); params files are UTF-8 YAML")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start}); params files are UTF-8 YAML") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of sections (family, collect, dqn, ...)")
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _has_key(d: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        in_list = isinstance(d, list) and isinstance(part, int) and 0 <= part < len(d)
        if not (in_list or (isinstance(d, Mapping) and part in d)):
            return False
        d = d[part]
    return True


_RULES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "extra_forbidden": "is not a known key",
    "missing": "is required",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "literal_error": "must be one of {expected}",
    "too_short": "must have at least {min_length} item(s)",
    "tuple_type": "must be a [low, high] pair",
    "finite_number": "must be a finite number",
    "string_too_short": "must not be empty",
    "too_long": "must have at most {max_length} item(s)",
    "string_pattern_mismatch": "must be a git branch name (letters, digits and . _ / -, not starting with . / -)",
}


def _format_error(err: Mapping[str, Any], source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    ctx = err.get("ctx") or {}
    rule = _RULES.get(err["type"])
    if rule is not None:
        try:
            rule = rule.format(**ctx)
        except (KeyError, IndexError):
            rule = None
    if rule is None:
        rule = str(err["msg"]).removeprefix("Value error, ")
    got = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {_short(err.get('input'))})"
    if err["type"] == "value_error":
        got = ""
    if loc and rule.startswith(loc + "."):  # a section's own rule already names its key in full
        loc = ""
    return f"{source}: {loc + ' ' if loc else ''}{rule}{got}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_params(path: Path | str = DEFAULT_PARAMS, overlay: Path | str | None = None) -> Params:
    """Reads ``path`` (and ``overlay``, else ``$METADQN_PARAMS``, merged over it) into :class:`Params`.

    Raises :class:`ParamsError` with a one-line message on any mistake.
    """
    path = Path(path)
    overlay = overlay if overlay is not None else os.environ.get(PARAMS_ENV) or None
    if overlay is not None and os.environ.get("DVC_STAGE"):
        # inside `dvc repro` the overlay would change results that dvc.lock records as params.yaml's values
        raise ParamsError(f"{overlay}: a params overlay (--params or ${PARAMS_ENV}) is refused inside the DVC stage "
                          f"{os.environ['DVC_STAGE']}: DVC tracks only params.yaml; put the values there (or unset "
                          f"${PARAMS_ENV})")
    data = _read_yaml(path)
    over: dict[str, Any] = {}
    if overlay is not None:
        over = _read_yaml(Path(overlay))
        data = _merge(data, over)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"]) or _key_in_message(str(err["msg"]))
        source = str(overlay) if overlay is not None and loc and _has_key(over, loc) else str(path)
        raise ParamsError(_format_error(err, source)) from None


def _key_in_message(msg: str) -> tuple[str, ...]:
    """The first dotted params key a cross-section rule's message names (to tell which file set it)."""
    import re

    found = re.search(r"\b([a-z_]+(?:\.[a-z_]+)+)\b", msg)
    return tuple(found.group(1).split(".")) if found else ()
