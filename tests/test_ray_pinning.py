"""GPU-type pinning on a multi-node cluster whose nodes claim different accelerator types."""
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1})
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H200": 1})
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_units_run_on_the_gpu_type_they_are_pinned_to(mixed_cluster, write_spec, tmp_path):
    import ray

    from flexvlm_ray.run.launch import launch
    from flexvlm_ray.store.reader import load_frame

    spec = write_spec("""
name: pin
experiment: quickstart
model: {family: simulated, options: {decode_ms_per_token: 0.2}}
datasets: [{name: probe_grid, num_samples: 2}]
knobs: {top_k: [1, 8]}
gpu_types: [H100, H200]
measure: {warmup: 0}
""")
    run_dir, summary = launch(spec_path=str(spec), output=str(tmp_path), run_id="r", progress=False)
    assert summary.ok and summary.done == 4
    rows = load_frame(run_dir)
    assert set(rows["gpu_type"]) == {"H100", "H200"}
    assert all(w.endswith(t) for w, t in zip(rows["worker"], rows["gpu_type"]))
    node_types = {n["NodeID"]: [k for k in n["Resources"] if k.startswith("accelerator_type:")]
                  for n in ray.nodes()}
    for worker in summary.workers:
        assert node_types[worker["node_id"]] == [f"accelerator_type:{worker['worker'].split('-')[-1]}"]


def test_pinning_to_an_absent_type_is_a_clear_error(mixed_cluster, write_spec, tmp_path):
    from flexvlm_ray.run.launch import launch

    spec = write_spec("""
name: pin2
experiment: quickstart
model: {family: simulated}
datasets: [{name: probe_grid, num_samples: 1}]
gpu_types: [A100]
""")
    with pytest.raises(RuntimeError, match="no GPU in the cluster for units pinned to A100; the cluster offers"):
        launch(spec_path=str(spec), output=str(tmp_path), run_id="r", progress=False)
