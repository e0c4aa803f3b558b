"""Device mesh and logical-axis rules: how parameters and activations are laid out over devices.

The mesh has three axes:
  `data`   data parallelism: the batch is split, parameters are replicated.
  `fsdp`   fully sharded data parallelism: the batch is split *and* parameters are sharded along `embed`
           (gathered layer by layer for the matmuls, ZeRO-3 style).
  `tensor` tensor (model) parallelism: heads, the MLP width and the vocabulary are split (Megatron style).

A size-1 axis costs nothing, so one set of rules serves data parallel (data=N), FSDP (fsdp=N), tensor parallel
(tensor=N) and any mix. `DEFAULT_LOGICAL_AXIS_RULES` maps the model's logical axis names onto those mesh axes; the
rules are tried in order and a mesh axis is used at most once per array (so activations [batch, length, embed] put the
batch on data x fsdp and keep embed whole).

Grouped-query attention: key/value projections and the KV cache carry `kv_heads` (g heads, fewer than the h query
heads). They are split over `tensor` like the query heads, which needs g % tensor == 0; when it does not (2 kv heads
on tensor=4), every sharding is refused with the fix: a tensor axis that divides g, or `replicate_kv_heads(rules)`,
which keeps K/V whole on every tensor shard (each shard then computes its query heads against all g K/V heads:
the same numbers, more K/V memory).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LogicalAxisRules = Sequence[tuple[str, Any]]

DEFAULT_LOGICAL_AXIS_RULES: LogicalAxisRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1) -> tuple[int, int, int]:
  """Resolves a (data, fsdp, tensor) request, where at most one axis is -1 ("the rest"), against `num_devices`."""
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  rest = [name for name, size in sizes.items() if size == -1]
  bad = [f"{name}={size}" for name, size in sizes.items() if size == 0 or size < -1]
  if len(rest) > 1 or bad:
    raise ValueError(f"mesh axes {sizes}: sizes must be positive, with at most one -1 ({bad or rest})")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if num_devices % fixed:
      raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: {num_devices} devices are not divisible "
                       f"by the fixed axes' product {fixed}")
    sizes[rest[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} needs "
                     f"{math.prod(sizes.values())} devices, but {num_devices} are available")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the `data` and `fsdp` axes (batch sizes must be multiples)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `Mesh` with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes).

  Axes are `Auto` (GSPMD propagates shardings from the parameters and the logical constraints).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(len(devices), data, fsdp, tensor)
  return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_partition_specs(boxed_tree: Any, rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """Mesh `PartitionSpec`s for a tree of `nn.LogicallyPartitioned` leaves (concrete or abstract)."""
  return nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding`s for a tree of logically partitioned leaves; checks that every sharded dim divides evenly."""
  specs = logical_partition_specs(boxed_tree, rules)
  boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x, boxed_tree, is_leaf=boxed)
  names = jax.tree.map(lambda x: tuple(x.names) if boxed(x) else "", boxed_tree, is_leaf=boxed)
  jax.tree_util.tree_map_with_path(lambda path, leaf, spec, axis_names: _check_divisible(
      path, leaf.shape, spec, mesh, axis_names), shapes, specs, names,
      is_leaf=lambda x: isinstance(x, PartitionSpec))
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicate_kv_heads(rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES) -> LogicalAxisRules:
  """`rules` with grouped K/V heads replicated instead of split over `tensor` (see the module docstring)."""
  return tuple(("kv_heads", None) if name == "kv_heads" else (name, axes) for name, axes in rules)


def _check_divisible(path, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh,
                     names: Optional[tuple] = None) -> None:
  for i, (dim, axes) in enumerate(zip(shape, spec)):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    ways = math.prod(mesh.shape[a] for a in axes)
    if dim % ways == 0:
      continue
    if names is not None and names[i] == "kv_heads":
      raise ValueError(f"{jax.tree_util.keystr(path)}: {dim} key/value heads (grouped-query attention) cannot be "
                       f"split {ways} ways over mesh axes {axes} (mesh {dict(mesh.shape)}); use a tensor axis that "
                       f"divides {dim}, or partitioning.replicate_kv_heads(rules) to keep K/V whole on every shard")
    raise ValueError(f"{jax.tree_util.keystr(path)} has shape {shape}: dimension {dim} cannot be split "
                     f"{ways} ways over mesh axes {axes} (mesh {dict(mesh.shape)}); change the mesh or the rules")


def abstract_params(init_fn: Callable[[jax.Array], Any], rng: jax.Array) -> Any:
  """Shapes and logical axes of `init_fn(rng)` without computing it."""
  return jax.eval_shape(init_fn, rng)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """Runs `init_fn(rng)` (returning boxed params) under jit so each device materialises only its own shards.

  Returns unboxed arrays laid out by the rules: no full copy is ever made on one device.
  """
  shardings = logical_shardings(abstract_params(init_fn, rng), mesh, rules)
  return jax.jit(lambda key: nn.unbox(init_fn(key)), out_shardings=shardings)(rng)


def shard_host_arrays(arrays: Any, shardings: Any) -> Any:
  """Places host (numpy) arrays onto devices by `shardings`, reading only the slices each local device holds.

  Works on multi-host meshes too: every process passes the same full-shaped host arrays (or memory maps).
  """
  def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index]))
  return jax.tree.map(place, arrays, shardings)


def jit_host_io(fn: Callable[..., Any], init_fn: Callable[[jax.Array], Any], input_axes: Sequence[tuple],
                mesh: Optional[Mesh] = None, rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES
                ) -> Callable[..., Any]:
  """`fn(params, *inputs)` under jit, called with host (numpy) inputs and returning numpy outputs.

  With a mesh: params laid out as `init_fn`'s logical axes say, input i sharded by its logical axes `input_axes[i]`
  (e.g. ("batch", "length")), outputs replicated. Every process passes the whole inputs and gets the whole outputs
  (multi-host too). Call it inside `activation_rules(mesh, rules)`.
  """
  if mesh is None:
    jitted = jax.jit(fn)
    return lambda params, *inputs: jax.tree.map(np.asarray, jitted(params, *inputs))
  params = logical_shardings(abstract_params(init_fn, jax.random.key(0)), mesh, rules)
  inputs = tuple(NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules)) for axes in input_axes)
  jitted = jax.jit(fn, in_shardings=(params,) + inputs, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def call(params, *host_inputs):
    outputs = jitted(params, *shard_host_arrays(tuple(host_inputs), inputs))
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), outputs)
  return call


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Context for model calls on a mesh, so activations get their sharding constraints:
  `with activation_rules(mesh, rules): model.apply(...)`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
