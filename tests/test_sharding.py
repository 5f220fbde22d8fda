"""Mesh resolution, logical-axis rules, and host-local <-> global batches."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import sharding


def test_mesh_shape_fills_minus_one_and_rejects_mismatch():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "model": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "model": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "model": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "model": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "model": 1}, 8)


def test_make_mesh_axes_and_order():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  assert mesh.axis_names == ("data", "fsdp", "model") and mesh.devices.shape == (2, 2, 2)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_logical_rules_divisibility_and_unknown_names():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh, rules) == P("fsdp", "model")
  # Unknown logical names (and None) replicate.
  assert sharding.logical_to_spec(("something_new", "mlp"), (32, 64), mesh, rules) == P(None, "model")
  # A dimension not divisible by its mesh axis stays replicated.
  assert sharding.logical_to_spec(("embed", "mlp"), (33, 64), mesh, rules) == P(None, "model")
  # A mesh axis is used at most once per parameter.
  assert sharding.logical_to_spec(("mlp", "heads"), (4, 4), mesh, rules) == P("model")
  assert sharding.logical_to_spec(None, (4, 4), mesh, rules) == P()


def test_param_specs_with_regex_overrides():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  params = {"head": {"kernel": jax.ShapeDtypeStruct((32, 10), np.float32)},
            "block": {"fc": {"kernel": jax.ShapeDtypeStruct((32, 64), np.float32)}}}
  logical = {"head": {"kernel": P("embed", "classes")}, "block": {"fc": {"kernel": P("embed", "mlp")}}}
  specs = sharding.param_specs(params, logical, mesh)
  assert specs["head"]["kernel"] == P("fsdp") and specs["block"]["fc"]["kernel"] == P("fsdp", "model")
  specs = sharding.param_specs(params, logical, mesh, overrides=[("head/.*", "replicate"),
                                                                  ("block/.*", "fsdp")])
  assert specs["head"]["kernel"] == P() and specs["block"]["fc"]["kernel"] == P(None, "fsdp")


def test_global_batch_round_trip_and_divisibility():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = sharding.global_batch({"x": x}, mesh)["x"]
  assert g.shape == (16, 3) and g.sharding.spec == P(("data", "fsdp"))
  assert len(g.addressable_shards) == 8 and g.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(sharding.to_host(g), x)
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 batch shards"):
    sharding.check_batch_size(12, mesh)
