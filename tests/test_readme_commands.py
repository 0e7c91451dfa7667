"""The README's 'Every phase's data' commands, read from the README itself: every line's flags parse as its script
takes them (its own argparse, run in-process up to main), every input folder is made by a line above it, and
every phase and NeMo stage of configs/phases.yaml finds its latents and captions made, from the same tars, at its
resolution and with its tokenizer. tests/test_data_sources.py runs phase 3's lines (two tar folders as one
dataset) on loopback data; the others' scripts and flags run end to end in test_data_pipeline / test_data_sources.
"""
import runpy
import sys

import pytest

import SD_Model
import SD_Train
import sd_common
from data_fixtures import REPO, readme_commands

SEED = [f"phase{i}" for i in range(1, 8)]
NEMO = ["nemo_pretrain_256", "sd11", "sd12", "sd15", "sd2_pretrain_256", "sd2_base_512"]


class Parsed(Exception):
    """Raised in place of run_main: the script's argparse accepted the line, here is what it made of it."""


def parse(script, args, monkeypatch):
    """The argparse Namespace `python SCRIPT ARGS` would run main with, without running main."""
    def stop(main, parsed):
        raise Parsed(parsed)
    monkeypatch.setattr(sd_common, "run_main", stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except Parsed as p:
        return p.args[0]
    except SystemExit as e:
        pytest.fail(f"README line `{script} {' '.join(args)}` does not parse (exit {e.code})")
    pytest.fail(f"{script} did not reach run_main")


def test_every_phase_is_made_by_the_readme_commands(monkeypatch):
    made = {}                                   # folder -> the Namespace of the line that made it
    lines = readme_commands()
    assert len(lines) >= 40
    for _, script, args in lines:
        ns = parse(script, args, monkeypatch)
        inputs = {"02_filter_metadata.py": [ns.meta] if script.startswith("02") else [],
                  "03_download_images.py": [ns.meta] if script.startswith("03_d") else [],
                  "04_preprocess_to_cache.py": ns.tars if script.startswith("04") else [],
                  "05_build_hf_dataset.py": [ns.batches] if script.startswith("05") else [],
                  "encode_latents.py": ns.tars if script == "encode_latents.py" else []}.get(script, [])
        for folder in inputs:
            assert folder in made, f"`{script} {' '.join(args)}` reads '{folder}', which no line above makes"
        made[ns.out] = (script, ns)

    for phase in SEED + NEMO:
        cfg = SD_Train.resolve_config(SD_Train.parse_args(["--phase", phase]))
        text_encoder = cfg["text_encoder"] or SD_Model.DEFAULT_TEXT_ENCODER[cfg["model"]]
        for d in cfg["datasets"]:
            script, enc = made.get(d["latents"], (None, None))
            assert script == "encode_latents.py", f"{phase}: no README line makes its latents '{d['latents']}'"
            assert enc.resolution == cfg["resolution"], f"{phase}: '{d['latents']}' encoded at {enc.resolution} px"
            script, hf = made.get(d["captions"], (None, None))
            assert script == "05_build_hf_dataset.py", f"{phase}: no README line makes its captions '{d['captions']}'"
            tok = made[hf.batches][1]
            assert tok.text_encoder == text_encoder, \
                f"{phase}: '{d['captions']}' tokenized by {tok.text_encoder}'s tokenizer, not {text_encoder}'s"
            # latents and captions from the same tars: the same keys on both sides
            assert sorted(tok.tars) == sorted(enc.tars), f"{phase}: captions from {tok.tars}, latents from {enc.tars}"


def test_every_laion_phase_has_a_preset_and_the_others_name_their_script(monkeypatch, tmp_path, capsys):
    """02's preset per phase: the seed's thresholds, NeMo's resolution filters (>= 1024 for SD 1.1, >= 512 for
    1.2 / 1.5 / 2.0-base, none at 256 px); phases 3-5 are not LAION data and say which script makes theirs."""
    from data_fixtures import laion_rows, write_parquet
    sizes = [(1024, 1024), (2048, 1100), (1023, 2000), (600, 512), (511, 900), (256, 256)]
    write_parquet(tmp_path / "meta" / "a.parquet", laion_rows(len(sizes), width=[w for w, _ in sizes],
                                                              height=[h for _, h in sizes]))
    want = {"sd11": 2, "sd12": 4, "sd15": 4, "sd2_base_512": 4, "nemo_pretrain_256": 6, "sd2_pretrain_256": 6,
            "phase1": 4, "phase2": 0, "phase6": 0, "phase7": 0}
    got = {}
    for preset in want:
        out = tmp_path / preset
        monkeypatch.setattr(sys, "argv", ["02", "--meta", str(tmp_path / "meta"), "--out", str(out), "--preset", preset])
        try:
            runpy.run_path(str(REPO / "02_filter_metadata.py"), run_name="__main__")
        except SystemExit as e:                  # nothing kept (phase2: aesthetic 7.0 < 7.5) is exit 1, one line
            assert e.code == 1 and want[preset] == 0
        import pyarrow.parquet as pq
        got[preset] = pq.read_table(out / "a.parquet").num_rows if (out / "a.parquet").exists() else 0
    assert got == want
    for preset in ("phase3", "phase4", "phase5"):
        monkeypatch.setattr(sys, "argv", ["02", "--meta", str(tmp_path / "meta"), "--out", str(tmp_path / preset),
                                          "--preset", preset])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(REPO / "02_filter_metadata.py"), run_name="__main__")
        assert e.value.code == 1
        assert "not LAION metadata" in capsys.readouterr().err
