"""`tinyllm bench` on a tiny model: the JSON it writes and the profile it prints (no timing assertions)."""
import json
import subprocess
import sys

import pytest


def test_bench_json_and_profile(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "tinyllm", "bench", "--model", str(tiny_model_dir), "--ops", "reference",
                        "--ops", "fused,attention=reference", "--rounds", "2", "--prompt-tokens", "8",
                        "--new-tokens", "4", "--threads", "1", "--profile", "--json", str(out),
                        "--plot", str(tmp_path / "profile.png")],
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


    # the plot: a real PNG (signature, then the IHDR chunk with the image size), not an empty file
    png = (tmp_path / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 800 and height >= 400 and len(png) > 20_000


@pytest.mark.parametrize("option, where, message", [
    ("--plot", "no/plot.png", "cannot write --plot {tmp}/no/plot.png: {tmp}/no does not exist"),
    ("--json", "a-file/out.json", "cannot write --json {tmp}/a-file/out.json: {tmp}/a-file is not a directory"),
    ("--plot", ".", "--plot {tmp} is a directory"),
    ("--json", ".", "--json {tmp} is a directory"),
    ("--json", "", "--json is empty"),
    ("--plot", "", "--plot is empty"),
])
def test_bench_output_that_cannot_be_written_fails_before_measuring(tiny_model_dir, tmp_path, option, where,
                                                                    message):
    (tmp_path / "a-file").write_text("")
    path = str(tmp_path / where) if where else ""
    r = subprocess.run([sys.executable, "-m", "tinyllm", "bench", "--model", str(tiny_model_dir), "--ops", "reference",
                        option, path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "starting" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: " + message.format(tmp=tmp_path)), r.stderr


def test_bench_rejects_a_bad_spec_before_starting(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "tinyllm", "bench", "--model", str(tiny_model_dir), "--ops", "warp"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown preset 'warp'")
