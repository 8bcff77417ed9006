import json

from . import load_script


def _load():
    return load_script("bench_densecrf")


def test_benchmark_quick_run_writes_results(tmp_path):
    bench = _load()
    out = tmp_path / "bench.json"
    argv = ["--quick", "--sizes", "24x16", "--impls", "deepcrf-compat,pydensecrf", "--threads", "1"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["machine"]["cores"] >= 1
    rows = {r["impl"]: r for r in payload["results"]}
    ours = rows["deepcrf-compat"]
    assert (ours["width"], ours["height"], ours["iters"]) == (24, 16, 5)
    assert ours["seconds"] > 0 and ours["cold_seconds"] > 0 and "peak_rss_mb" in ours
    assert ours["extra_peak_mb"] == ours["peak_rss_mb"] - ours["baseline_peak_mb"]
    # pydensecrf is optional: either measured or reported as skipped, never an error.
    assert "error" not in rows["pydensecrf"]


def test_benchmark_case_is_deterministic_and_valid():
    bench = _load()
    image, unary = bench._make_case(20, 12)
    image2, unary2 = bench._make_case(20, 12)
    assert image.shape == (12, 20, 3) and image.dtype.name == "uint8"
    assert unary.shape == (bench.LABELS, 240) and unary.dtype.name == "float32"
    assert (image == image2).all() and (unary == unary2).all()
