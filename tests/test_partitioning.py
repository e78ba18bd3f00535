"""Mesh, rules and shardings on 8 simulated CPU devices (tests/conftest.py)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from gensar_jax import optimizers
from gensar_jax import partitioning
from gensar_jax import trainer as trainer_lib
from task_world import input_shapes, synthetic_batch, tiny_model


def test_create_mesh_fills_minus_one_and_rejects_bad_sizes():
  mesh = partitioning.create_mesh(data=-1, model=2)
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert dict(partitioning.create_mesh(data=2, model=-1).shape) == {"data": 2, "model": 4}
  # Devices in jax.devices() order, data-major: each data row is a contiguous block.
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
  with pytest.raises(ValueError, match="cannot be split"):
    partitioning.create_mesh(data=-1, model=3)
  with pytest.raises(ValueError, match="does not match"):
    partitioning.create_mesh(data=2, model=2)
  with pytest.raises(ValueError, match="at most one"):
    partitioning.create_mesh(data=-1, model=-1)
  with pytest.raises(ValueError, match="positive int"):
    partitioning.create_mesh(data=0, model=1)


@pytest.mark.parametrize("fsdp", [False, True])
def test_rules_shard_params_over_data_only_with_fsdp_and_never_activation_embed(fsdp):
  p = partitioning.Partitioner(partitioning.create_mesh(data=4, model=2), fsdp=fsdp)
  data_or_none = "data" if fsdp else None
  # Parameters.
  assert p.logical_to_mesh_axes(("embed", "mlp")) == P(data_or_none, "model")
  assert p.logical_to_mesh_axes(("vocab", "embed")) == P("model", data_or_none)
  assert p.logical_to_mesh_axes(("embed", "joined_kv")) == P(data_or_none, "model")
  assert p.logical_to_mesh_axes(("heads", "relpos_buckets")) == P("model", None)
  # Activations: batch takes 'data' first, so embed is never sharded with FSDP on.
  assert p.logical_to_mesh_axes(("batch", "length", "embed")) == P("data", None, None)
  assert p.logical_to_mesh_axes(("batch", "length", "vocab")) == P("data", None, "model")
  assert p.logical_to_mesh_axes(("batch", "length", "heads", "kv")) == P("data", None, "model",
                                                                         None)


def test_indivisible_dimension_falls_back_to_replication(caplog):
  p = partitioning.Partitioner(partitioning.create_mesh(data=4, model=2), fsdp=True)
  boxed = {
      "odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((30, 64), jnp.float32),
                                     ("embed", "mlp")),
      "even": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((32, 63), jnp.float32),
                                      ("embed", "mlp")),
      "plain": jax.ShapeDtypeStruct((5,), jnp.float32),
  }
  # partitioning logs through absl, whose logger TensorFlow leaves at WARNING after a
  # SavedModel save (its set_verbosity round trip in test_export): set it for this block.
  with caplog.at_level("INFO", logger="absl"):
    shardings = p.params_shardings(boxed)
  assert shardings["odd"].spec == P(None, "model")   # 30 % 4 != 0: embed replicated
  assert shardings["even"].spec == P("data")          # 63 % 2 != 0: mlp replicated
  assert shardings["plain"].spec == P()
  assert "not divisible" in caplog.text
  # A batch of 6 cannot be split 4 ways: replicated, not an error.
  batch = p.shard_batch({"tokens": np.arange(12, dtype=np.int32).reshape(6, 2)})
  assert batch["tokens"].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(12).reshape(6, 2))


def test_shard_batch_gives_each_data_shard_its_rows():
  p = partitioning.Partitioner(partitioning.create_mesh(data=4, model=2))
  assert p.per_host_batch_slice(16) == slice(0, 16)   # one process owns every row
  local = {"x": np.arange(16 * 3, dtype=np.int32).reshape(16, 3),
           "y": np.arange(16, dtype=np.int32)[:, None]}
  batch = p.shard_batch(local)
  assert batch["x"].shape == (16, 3)
  assert batch["x"].sharding.spec == P("data")
  for shard in batch["x"].addressable_shards:
    rows = shard.index[0]
    assert shard.data.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), local["x"][rows])
  with pytest.raises(ValueError, match="same leading batch dimension"):
    p.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros((5, 2))})
  with pytest.raises(ValueError, match="owns rows"):
    p.shard_batch(local, global_batch_size=32)


def _spec(spec) -> P:
  """P('model', None) and P('model') mean the same layout; compare without trailing Nones."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _leaf(tree, *keys):
  for k in keys:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("fsdp", [False, True])
def test_train_state_is_created_sharded_as_the_rules_say(fsdp):
  p = partitioning.Partitioner(partitioning.create_mesh(data=4, model=2), fsdp=fsdp)
  trainer = trainer_lib.Trainer(tiny_model(), p, optimizers.create_optimizer())
  state = trainer.init_state(input_shapes(8))
  d = "data" if fsdp else None
  expected = {  # path -> (spec, per-device shard shape); emb 32, mlp 64, vocab 128, joined_kv 16
      ("token_embedder", "embedding"): (P("model", d), (64, 8 if fsdp else 32)),
      ("encoder", "layers_0", "mlp", "wi_0", "kernel"): (P(d, "model"), (8 if fsdp else 32, 32)),
      ("encoder", "layers_0", "mlp", "wo", "kernel"): (P("model", d), (32, 8 if fsdp else 32)),
      ("encoder", "layers_0", "attention", "query", "kernel"):
          (P(d, "model"), (8 if fsdp else 32, 8)),
      ("decoder", "logits_dense", "kernel"): (P(d, "model"), (8 if fsdp else 32, 64)),
      ("encoder", "relpos_bias", "rel_embedding"): (P("model"), (1, 32)),
      ("encoder", "encoder_norm", "scale"): (P(d) if fsdp else P(), (8 if fsdp else 32,)),
  }
  for path, (spec, shard_shape) in expected.items():
    leaf = _leaf(state.params, *path)
    assert _spec(leaf.sharding.spec) == _spec(spec), path
    assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), path
    assert leaf.dtype == jnp.float32
  # Every param leaf matches the precomputed shardings, and Adam's moments follow the params.
  for leaf, sharding in zip(jax.tree.leaves(state.params),
                            jax.tree.leaves(trainer.state_shardings.params)):
    assert leaf.sharding == sharding
  adam_state = state.opt_state[1][0]
  mu = _leaf(adam_state.mu, "token_embedder", "embedding")
  assert _spec(mu.sharding.spec) == _spec(P("model", d))
  assert adam_state.count.sharding.spec == P()
  assert state.step.sharding.spec == P() and int(state.step) == 0
  # state_shape is abstract and agrees with the real state.
  assert jax.tree.map(lambda s: (s.shape, s.dtype), trainer.state_shape) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), state)


def test_optimizer_state_leaves_follow_their_param_or_replicate():
  p = partitioning.Partitioner(partitioning.create_mesh(data=4, model=2), fsdp=True)
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  boxed = {"dense": {"kernel": nn.LogicallyPartitioned(sds(32, 64), ("embed", "mlp"))},
           "norm": {"scale": nn.LogicallyPartitioned(sds(32), ("embed",))}}
  params_shape = nn.meta.unbox(boxed)
  params_shardings = p.params_shardings(boxed)
  opt_shape = {  # the shapes optax's Adam and factored Adafactor keep
      "count": sds(),
      "mu": params_shape,
      "v_row": {"dense": {"kernel": sds(32)}, "norm": {"scale": sds(32)}},
  }
  got = p.derived_shardings(opt_shape, params_shape, params_shardings)
  assert got["mu"]["dense"]["kernel"].spec == P("data", "model")
  assert got["mu"]["norm"]["scale"].spec == P("data")
  assert got["count"].spec == P()
  assert got["v_row"]["dense"]["kernel"].spec == P()   # shape differs from its param
  assert got["v_row"]["norm"]["scale"].spec == P("data")  # same shape as the param


def test_bad_partitioner_and_mesh_inputs_are_named():
  from jax.sharding import Mesh
  bad_mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("batch",))
  with pytest.raises(ValueError, match="lack"):
    partitioning.Partitioner(bad_mesh)
  with pytest.raises(ValueError, match="empty batch"):
    partitioning.Partitioner(partitioning.create_mesh()).shard_batch({})


def test_synthetic_batch_is_consistent():
  batch = synthetic_batch(0, 4)
  # Teacher forcing: decoder inputs are the targets shifted right behind the PAD start.
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                batch["decoder_target_tokens"][:, :-1])
  assert (batch["decoder_input_tokens"][:, 0] == 0).all()


def test_data_index_i_holds_block_i_of_the_batch_as_jax_lays_it_out():
  """process_batch_rows (and tests/test_tpu_layouts.py) count rows by data index; this is
  the layout JAX itself gives a P('data') batch, whatever order the devices come in."""
  devices = list(reversed(jax.devices()))
  grid = partitioning.device_grid(4, 2, devices)
  assert [d.id for d in grid.flat] == [d.id for d in devices]  # one process: order kept
  p = partitioning.Partitioner(jax.sharding.Mesh(grid, partitioning.MESH_AXES))
  indices = p.batch_sharding((16,)).devices_indices_map((16,))
  for (i, _), device in np.ndenumerate(grid):
    assert (indices[device][0].start, indices[device][0].stop) == (4 * i, 4 * i + 4)
  assert p.per_host_batch_slice(16) == slice(0, 16)
  assert p.per_host_batch_slice(6) == slice(0, 6)   # not divisible: replicated, all rows
