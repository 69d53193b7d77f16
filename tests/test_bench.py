"""`tinyllm bench` on a tiny model: the JSON it writes and the profile it prints (no timing assertions)."""
import json
import subprocess
import sys


def test_bench_json_and_profile(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "tinyllm", "bench", "--model", str(tiny_model_dir), "--ops", "reference",
                        "--ops", "fused,attention=reference", "--rounds", "2", "--prompt-tokens", "8",
                        "--new-tokens", "4", "--threads", "1", "--profile", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["machine"]) == {"cpu", "cores", "threads", "python", "numpy", "numba", "blas"}
    assert data["machine"]["threads"] == 1
    assert [x["ops"] for x in data["results"]] == ["reference", "fused,attention=reference"]  # named as given
    for result in data["results"]:
        assert len(result["runs"]) == 2
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "weights_rss_mib", "peak_rss_mib"):
            assert result[key] > 0, key
        assert set(result["runs"][0]) == {"prefill_tok_s", "decode_tok_s", "ttft_s"}
    # the profile names each op with the variant that ran, for the prefill and for a decode step
    assert "prefill profile, fused,attention=reference" in r.stdout
    assert "decode step profile, fused,attention=reference" in r.stdout
    for phase in ("prefill", "decode"):
        rows = data["results"][1]["profile"][phase]
        assert rows[-1]["op"] == "(model code)" and abs(sum(row["pct"] for row in rows) - 100) < 1e-6
    assert any(line.split()[:2] == ["swiglu_mlp", "fused"] for line in r.stdout.splitlines())
    assert any(line.split()[:2] == ["attention", "reference"] for line in r.stdout.splitlines())


def test_bench_rejects_a_bad_spec_before_starting(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "tinyllm", "bench", "--model", str(tiny_model_dir), "--ops", "warp"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown preset 'warp'")
