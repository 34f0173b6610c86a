"""The control messages between the coordinator and its workers: small typed
records, sent over pyzmq as JSON objects that name their type.  Only the
coordinator and its own workers speak this; nothing here is ever read from a file."""
import json
from dataclasses import asdict, dataclass, field


# coordinator -> worker
@dataclass
class Init:
    rank: int
    n_workers: int
    model_type: str  # the model family's
    config: dict  # its config's fields()
    pool_rows: int  # batch rows of the pool (split between its workers by the strategy)
    first_row: int  # of this pool's rows in the global batch (MPI ranks after the first)
    seq_len: int
    batch_rows: int  # the global batch
    train: str
    val: str | None
    order_seed: int | None  # of the training windows' order (None: file order)
    optim: str  # the optimizer's name in trainer/optimizers.py
    threads: int
    cores: list | None
    profile: bool
    recompute: bool  # activation checkpointing
    training: dict  # what trains: its record() (trainer/trainable.py)
    gemm: str  # the engine's name
    parallel: str  # the strategy's name
    arenas: dict  # what -> shared-memory name
    elements: dict  # what -> elements
    barrier: dict  # this worker's pipe ends


@dataclass
class Step:
    """Forward, backward and this worker's weight gradients of one micro-batch."""
    window: int
    scale: float
    accumulate: bool  # a later micro-batch: add to the gradients
    last: bool  # the step's last micro-batch: report Σ g²


@dataclass
class SumSq:
    """Σ g² of this worker's optimizer shard (after the gradients changed under MPI)."""


@dataclass
class Update:
    """One optimizer step on each worker's shard."""
    hyper: dict  # the optimizer's hyper-parameters for this step (its hyper())


@dataclass
class Cast:
    """Make the bf16 copy of this worker's shard of freshly loaded weights."""


@dataclass
class Eval:
    windows: int


@dataclass
class Profile:
    pass


@dataclass
class Stop:
    pass


# worker -> coordinator
@dataclass
class Hello:
    pass


@dataclass
class Ready:
    blas: str


@dataclass
class StepReport:
    """What every strategy reports for a micro-batch; sumsq only on the last (Σ g² of
    the gradient elements this worker finished, which partition the whole)."""
    loss: float
    sumsq: float | None
    forward_s: float  # phases of work, without barrier waits
    backward_s: float
    convert_s: float  # bf16 conversions
    reduce_s: float  # summing gradients and their squares


@dataclass
class SumSqReport:
    sumsq: float
    seconds: float


@dataclass
class UpdateReport:
    seconds: float
    convert_s: float


@dataclass
class EvalReport:
    loss: float


@dataclass
class ProfileReport:
    layers: dict = field(default_factory=dict)  # layer function -> seconds
    flops: dict = field(default_factory=dict)  # layer function -> FLOPs of its products


@dataclass
class Done:
    pass


@dataclass
class Failed:
    error: str
    peer_gone: bool  # the cause is another worker that died


@dataclass
class Stopped:
    pass


TYPES = {cls.__name__: cls for cls in (Init, Step, SumSq, Update, Cast, Eval, Profile, Stop, Hello, Ready,
                                       StepReport, SumSqReport, UpdateReport, EvalReport, ProfileReport,
                                       Done, Failed, Stopped)}


def encode(message):
    return json.dumps({"type": type(message).__name__, **asdict(message)}).encode()


def decode(data):
    fields = json.loads(data)
    return TYPES[fields.pop("type")](**fields)
