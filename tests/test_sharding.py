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


def test_param_specs_from_logical_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  params = {"head": {"kernel": jax.ShapeDtypeStruct((32, 10), np.float32)},
            "block": {"fc": {"kernel": jax.ShapeDtypeStruct((32, 64), np.float32)}}}
  logical = {"head": {"kernel": P("embed", "classes")}, "block": {"fc": {"kernel": P("embed", "mlp")}}}
  specs = sharding.param_specs(params, logical, mesh)
  assert specs["head"]["kernel"] == P("fsdp") and specs["block"]["fc"]["kernel"] == P("fsdp", "model")


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


# --------------------------------------------------------------------------
# TPU slices (abstract devices from libtpu's topology descriptions)
# --------------------------------------------------------------------------
def tpu_devices(topology, num_slices=1):
  pytest.importorskip("libtpu", reason="TPU topologies need libtpu: pip install -e '.[tpu]'")
  from vit_jax import aot
  return aot.topology_devices(topology, num_slices)


def slice_of(mesh):
  return np.vectorize(lambda d: getattr(d, "slice_index", 0))(mesh.devices)


def process_rows(mesh, batch):
  """{process_index: sorted batch rows its devices hold} under the batch sharding."""
  rows = {}
  for d, index in sharding.batch_sharding(mesh).devices_indices_map((batch,)).items():
    rows.setdefault(d.process_index, set()).update(range(*index[0].indices(batch)))
  return {p: sorted(r) for p, r in rows.items()}


@pytest.mark.parametrize("mesh_config", [{"data": -1, "fsdp": 4, "model": 1},
                                         {"data": -1, "fsdp": 2, "model": 2}])
def test_two_slices_split_the_data_axis_and_keep_fsdp_and_model_groups_in_a_slice(mesh_config):
  devices = tpu_devices("v5e:2x2", 2)   # two slices of 4 chips, one host each
  mesh = sharding.make_mesh(mesh_config, devices)
  slices = slice_of(mesh)
  assert mesh.devices.shape[0] == 2 and set(slices.flat) == {0, 1}
  for d in range(mesh.devices.shape[0]):   # each fsdp x model group: one slice
    assert len(set(slices[d].flat)) == 1, slices
  assert (slices[0] == 0).all() and (slices[1] == 1).all()   # slices are data blocks, in order
  # Each host's batch rows are one contiguous block, host 0 first.
  assert process_rows(mesh, 32) == {0: list(range(16)), 1: list(range(16, 32))}


def test_multi_host_slices_give_each_host_its_share_of_the_batch():
  devices = tpu_devices("v5e:4x4", 2)   # two slices of 16 chips on 4 hosts each
  assert len({d.process_index for d in devices}) == 8
  mesh = sharding.make_mesh({"data": -1, "fsdp": 4, "model": 1}, devices)
  assert mesh.devices.shape == (8, 4, 1)
  slices = slice_of(mesh)
  assert all(len(set(slices[d].flat)) == 1 for d in range(8))
  assert (slices[:4] == 0).all() and (slices[4:] == 1).all()
  # Every host holds rows of one slice only, and as many as its local batch
  # (what make_array_from_process_local_data places, contiguous or not).
  rows = process_rows(mesh, 64)
  assert sorted(len(r) for r in rows.values()) == [8] * 8
  for p, r in rows.items():
    assert {getattr(d, "slice_index", 0) for d in devices if d.process_index == p} == {r[0] // 32}
    assert r[-1] // 32 == r[0] // 32
  # Inside a slice the devices lie as that slice alone would lay them out.
  alone = sharding.make_mesh({"data": -1, "fsdp": 4, "model": 1},
                             [d for d in devices if d.slice_index == 1])
  assert (mesh.devices[4:] == alone.devices).all()


def test_one_slice_follows_the_physical_topology():
  from jax.experimental import mesh_utils
  devices = tpu_devices("v5e:4x4")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 4, "model": 1}, devices)
  assert (mesh.devices == mesh_utils.create_device_mesh((4, 4, 1), devices)).all()


def test_fsdp_across_slices_only_when_asked_and_bad_splits_name_the_valid_ones():
  devices = tpu_devices("v5e:2x2", 2)
  with pytest.raises(ValueError, match=r"valid splits: dcn_data=1, dcn_fsdp=2\.$"):
    sharding.make_mesh({"data": -1, "fsdp": 8, "model": 1}, devices)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 8, "model": 1, "dcn_fsdp": 2}, devices)
  assert mesh.devices.shape == (1, 8, 1)
  assert list(slice_of(mesh).flat) == [0, 0, 0, 0, 1, 1, 1, 1]
  with pytest.raises(ValueError, match=r"dcn_data=3.*valid splits: dcn_data=2, dcn_fsdp=1; "
                                       r"dcn_data=1, dcn_fsdp=2\.$"):
    sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1, "dcn_data": 3}, devices)
  with pytest.raises(ValueError, match="no split fits"):
    sharding.make_mesh({"data": -1, "fsdp": 1, "model": 8}, devices)
  with pytest.raises(ValueError, match="1 slice of 8 devices"):   # not a TPU: one slice
    sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1, "dcn_data": 2})
