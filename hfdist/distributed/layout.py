"""How a job's ranks are laid out, and whether a config can run on a given number of ranks.

The device mesh is torchtitan's ``[dp_replicate, dp_shard, tp]``, tensor parallel innermost: the ranks of a
tensor-parallel group are consecutive, so they share a node whenever ``tensor_parallel`` divides the ranks per
node (required: tensor parallelism exchanges activations in every layer, which only intra-node links carry
fast enough). The data-parallel ranks are the rest: ``dp = world / tp``, split into ``replicate_degree``
replicas (HSDP) of ``dp / replicate_degree`` FSDP shards each. Ranks of one tensor-parallel group read the
same sequences, so the batch rule counts data-parallel ranks only.

``check_layout`` is the one place that decides whether a job can start: the launch calls it before joining
the process group (with the launcher's world size) and ``hfdist plan`` calls it for the planned cluster, so
the plan refuses exactly what the launch would refuse, with the same one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hfdist.adapters import check_trainable, transforms
from hfdist.config import Config
from hfdist.distributed.parallelize import tensor_parallel_plan
from hfdist.errors import HfdistError
from hfdist.models import ModelConfigUnreadable, read_hf_config


@dataclass(frozen=True)
class Layout:
    world_size: int
    ranks_per_node: int
    tensor_parallel: int = 1
    replicate_degree: int = 1

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own share of the global batch."""
        return self.world_size // self.tensor_parallel

    @property
    def shard_size(self) -> int:
        """Ranks one FSDP shard group spans (data-parallel ranks per replica)."""
        return self.dp_size // self.replicate_degree

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.ranks_per_node)

    def mesh_dims(self) -> dict[str, int]:
        """The device mesh's dimensions, outermost first (``dp_shard`` always; the others when > 1)."""
        dims = {"dp_replicate": self.replicate_degree} if self.replicate_degree > 1 else {}
        dims["dp_shard"] = self.shard_size
        if self.tensor_parallel > 1:
            dims["tp"] = self.tensor_parallel
        return dims

    def dp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel


def build_mesh(device_type: str, layout: Layout) -> DeviceMesh:
    """The device mesh of ``layout``: ``(dp_replicate?, dp_shard, tp?)``, tensor parallel innermost."""
    dims = layout.mesh_dims()
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def accumulation_steps(config: Config, dp_size: int) -> int:
    """Micro-batches per rank and step; refuses a global batch that does not split over the data-parallel ranks."""
    train = config.train
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise HfdistError(
            f"config field train.global_batch_size: {train.global_batch_size} is not divisible by "
            f"train.micro_batch_size ({train.micro_batch_size}) x data-parallel size ({dp_size})"
        )
    return train.global_batch_size // per_step


def check_layout(config: Config, world_size: int, ranks_per_node: int, hf_config=None) -> Layout:
    """The layout of ``config`` on ``world_size`` ranks (``ranks_per_node`` per node), or a one-line HfdistError
    naming the field that does not fit. ``hf_config`` (the model's transformers config, when known) adds the
    checks that need the architecture: the family needs a tensor-parallel plan, which must divide the heads and
    the MLP width."""
    dist = config.distributed
    backend, tp, replicate = dist.backend, dist.tensor_parallel, dist.replicate_degree
    if backend == "single":
        if world_size > 1:
            raise HfdistError(
                f"config field distributed.backend: 'single' runs one process, but the job has "
                f"{world_size} ranks; set distributed.backend=fsdp or deepspeed"
            )
        if tp > 1 or replicate > 1:
            name = "tensor_parallel" if tp > 1 else "replicate_degree"
            raise HfdistError(
                f"config field distributed.{name}: needs several ranks (distributed.backend=fsdp); "
                "the single backend runs one process"
            )
    if tp > 1 and backend != "fsdp":
        raise HfdistError(
            f"config field distributed.tensor_parallel: {tp} needs distributed.backend=fsdp "
            f"(tensor parallelism is composed with FSDP2; {backend!r} does not shard that way)"
        )
    if world_size % tp:
        raise HfdistError(
            f"config field distributed.tensor_parallel: {tp} does not divide the {world_size} ranks"
        )
    if ranks_per_node % tp:
        raise HfdistError(
            f"config field distributed.tensor_parallel: {tp} does not divide the {ranks_per_node} ranks "
            "per node; a tensor-parallel group must lie inside one node"
        )
    layout = Layout(world_size, ranks_per_node, tp, replicate)
    if backend == "deepspeed" and replicate > 1:
        raise HfdistError(
            "config field distributed.replicate_degree: HSDP is an fsdp option (ZeRO-3 shards over all ranks)"
        )
    if layout.dp_size % replicate:
        raise HfdistError(
            f"config field distributed.replicate_degree: {replicate} does not divide the "
            f"{layout.dp_size} data-parallel ranks (world {world_size} / tensor_parallel {tp})"
        )
    accumulation_steps(config, layout.dp_size)
    if hf_config is not None and tp > 1:
        check_tensor_parallel_fits(hf_config, tp)
    check_trainable(config, hf_config)
    return layout


def check_tensor_parallel_fits(hf_config, tp: int) -> None:
    """The model's family must have a tensor-parallel plan hfdist applies (``tensor_parallel_plan``), and the
    attention heads, key/value heads and the MLP width must split evenly over the tensor-parallel ranks (the
    vocabulary need not: its shards may differ by a row). Each rank computes whole key/value heads: more
    tensor-parallel ranks than key/value heads (which would need them replicated) is refused."""
    tensor_parallel_plan(hf_config)
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if tp > kv_heads:
        raise HfdistError(
            f"config field distributed.tensor_parallel: {tp} exceeds the model's {kv_heads} key/value heads "
            "(each tensor-parallel rank computes whole key/value heads; replicating them is not supported)"
        )
    sizes = {
        "attention heads": heads,
        "key/value heads": kv_heads,
        "MLP width (intermediate_size)": getattr(hf_config, "intermediate_size", tp),
    }
    for what, size in sizes.items():
        if size % tp:
            raise HfdistError(
                f"config field distributed.tensor_parallel: {tp} does not divide the model's {size} {what}"
            )


def launch_layout(
    config: Config, world_size: int, ranks_per_node: int, hf_config: Optional[object] = None
) -> Layout:
    """check_layout with the model's config read when the architecture matters (tensor parallelism, what trains)."""
    if hf_config is None and (config.distributed.tensor_parallel > 1 or transforms(config)):
        try:
            hf_config = read_hf_config(config.model)
        except ModelConfigUnreadable:
            hf_config = None  # the model loading reports it
    return check_layout(config, world_size, ranks_per_node, hf_config)
