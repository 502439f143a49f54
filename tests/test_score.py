"""`simsearch score` / simsearch.scoring: pairing, report contents, determinism, HTML, bad input.

Pairing and bad input need no model; report structure and determinism run on a tiny random DINOv2
(12 blocks, so the default descriptor layers exist); "an identical copy scores ~1 and above a different
image" runs on the embedded model.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, run_cli
from simsearch.errors import SimsearchError
from simsearch.scoring import make_pairs, score, write_score_html


def photo(name: str, size=(64, 64)) -> Image.Image:
    return Image.open(EXAMPLES / f"{name}.jpg").convert("RGB").resize(size, Image.Resampling.BICUBIC)




@pytest.fixture
def named(tmp_path) -> tuple[Path, Path, dict]:
    """refs/{cat,dog,tree,bird}; gen/ named to exercise every rule. -> (refs, gen, expected ref->gens)."""
    refs, gen = tmp_path / "refs", tmp_path / "gen"
    refs.mkdir()
    gen.mkdir()
    srcs = {"cat": "chelsea", "dog": "coffee", "tree": "grass", "bird": "rocket"}
    for stem, src in srcs.items():
        photo(src).save(refs / f"{stem}.png")
    expected = {
        "cat": ["cat.png", "cat_1.png", "cat-2.jpg"],  # same stem; <stem>_...; <stem>-...
        "dog": ["dog_003.png"],
        "tree": ["tree/a.png", "tree/b.png"],  # folder named after the stem
        "bird": [],  # nothing generated for it
    }
    for stem, files in expected.items():
        for i, rel in enumerate(files):
            (gen / rel).parent.mkdir(parents=True, exist_ok=True)
            photo(list(srcs.values())[(list(srcs).index(stem) + i) % 4]).save(gen / rel)
    for rel in ("orphan.png", "catalog.png", "dogs/x.png"):  # no separator after the stem: no match
        (gen / rel).parent.mkdir(parents=True, exist_ok=True)
        photo("horse").save(gen / rel)
    return refs, gen, expected


def rel_pairs(pairs, refs: Path, gen: Path) -> set[tuple[str, str]]:
    return {(Path(r).relative_to(refs).as_posix(), Path(g).relative_to(gen).as_posix()) for r, g in pairs}


# -- pairing (no model) ----------------------------------------------------------------------------
def test_pairs_by_name(named):
    refs, gen, expected = named
    pairs, unmatched = make_pairs(refs, gen)
    want = {(f"{stem}.png", g) for stem, gens in expected.items() for g in gens}
    assert rel_pairs(pairs, refs, gen) == want
    assert len(pairs) == len(want)  # no duplicates
    assert {Path(u).relative_to(gen).as_posix() for u in unmatched} == {"orphan.png", "catalog.png", "dogs/x.png"}
    assert all(Path(p).is_absolute() for pair in pairs for p in pair)


def test_pairs_by_name_with_overlapping_reference_names(tmp_path):
    """References 'dog' and 'dog_2': 'dog_2_1.png' belongs to 'dog_2' (the longest matching name),
    not to both; 'dog_1.png' belongs to 'dog' only; 'dog_2.png' to 'dog_2' only."""
    refs, gen = tmp_path / "refs", tmp_path / "gen"
    refs.mkdir()
    gen.mkdir()
    for stem in ("dog", "dog_2"):
        photo("coffee").save(refs / f"{stem}.png")
    for stem in ("dog_1", "dog_2", "dog_2_1"):
        photo("coffee").save(gen / f"{stem}.png")
    pairs, unmatched = make_pairs(refs, gen)
    assert sorted(rel_pairs(pairs, refs, gen)) == [
        ("dog.png", "dog_1.png"), ("dog_2.png", "dog_2.png"), ("dog_2.png", "dog_2_1.png")]
    assert unmatched == []


def test_single_reference_image_against_a_folder(named):
    refs, gen, _ = named
    pairs, unmatched = make_pairs(refs / "cat.png", gen)
    gens = sorted(p.relative_to(gen).as_posix() for p in gen.rglob("*.*"))
    assert len(gens) == 9
    assert rel_pairs(pairs, refs, gen) == {("cat.png", g) for g in gens}
    assert unmatched == []


def test_all_pairs(named):
    refs, gen, _ = named
    pairs, unmatched = make_pairs(refs, gen, all_pairs=True)
    assert len(pairs) == 4 * 9 and len(set(pairs)) == 36 and unmatched == []


def test_pairs_csv(named, tmp_path):
    refs, gen, _ = named
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("ref,gen,note\ncat.png,orphan.png,x\ndog.png,tree/a.png,y\n"
                        f"{refs / 'bird.png'},{gen / 'catalog.png'},absolute paths\n")
    pairs, unmatched = make_pairs(refs, gen, pairs_csv=csv_path)
    assert [(Path(r).name, Path(g).relative_to(gen).as_posix()) for r, g in pairs] == [
        ("cat.png", "orphan.png"), ("dog.png", "tree/a.png"), ("bird.png", "catalog.png")]  # CSV order kept
    assert unmatched == []


@pytest.mark.parametrize("content,words", [
    ("a,b\ncat.png,orphan.png\n", ["ref,gen"]),  # wrong columns
    ("", ["ref,gen"]),  # empty file
    ("ref,gen\ncat.png,missing.png\n", ["line 2", "missing.png"]),  # a file that is not there
    ("ref,gen\ncat.png\n", ["line 2"]),  # a row with a missing cell
    ("ref,gen\n\x00\x01\x02,\xff\n", []),  # junk
])
def test_bad_pairs_csv_is_a_simsearch_error(named, tmp_path, content, words):
    refs, gen, _ = named
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(content, encoding="latin-1")
    with pytest.raises(SimsearchError) as e:
        make_pairs(refs, gen, pairs_csv=csv_path)
    for w in words:
        assert w in str(e.value)


def test_missing_pairs_csv_is_a_simsearch_error(named, tmp_path):
    refs, gen, _ = named
    with pytest.raises(SimsearchError, match="nope.csv"):
        make_pairs(refs, gen, pairs_csv=tmp_path / "nope.csv")


def test_pairs_csv_with_a_byte_order_mark(named, tmp_path):
    """Spreadsheets save 'CSV UTF-8' with a BOM; the header is still ref,gen."""
    refs, gen, _ = named
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("ref,gen\ncat.png,orphan.png\n", encoding="utf-8-sig")
    pairs, _ = make_pairs(refs, gen, pairs_csv=csv_path)
    assert len(pairs) == 1


def test_pairing_errors(named, tmp_path):
    refs, gen, _ = named
    with pytest.raises(SimsearchError, match="no such"):
        make_pairs(tmp_path / "nope", gen)
    with pytest.raises(SimsearchError, match="no such"):
        make_pairs(refs, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimsearchError, match="no images"):
        make_pairs(refs, tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    photo("horse").save(other / "zebra.png")
    with pytest.raises(SimsearchError, match=r"pass pairs \(a CSV of ref,gen\), or all_pairs=True$"):
        make_pairs(refs, other)


# -- the report, on the tiny model -------------------------------------------------------------------
def test_score_cli_json_csv_html(cli, named, tiny12, tmp_path):
    refs, gen, expected = named
    out_json, out_csv, out_html = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.html"
    code, out, err = cli("score", "--ref", refs, "--gen", gen, "--model", tiny12, "--out", out_json,
                         "--html", out_html)
    assert code == 0, err
    assert "3 generated images match no reference" in err
    r = json.loads(out_json.read_text())
    n_pairs = sum(len(v) for v in expected.values())
    # configuration that produced the numbers
    assert r["config"]["descriptors"]["model"] == str(tiny12)
    assert {"image_size", "content_pooling", "style_layer", "dense_layer"} <= set(r["config"]["descriptors"])
    assert re.fullmatch(r"[0-9a-f]{8,}", r["config"]["weights"])
    assert set(r["metrics"]) == {"cosine", "style", "aas"}
    # per pair
    assert len(r["pairs"]) == n_pairs
    for p in r["pairs"]:
        assert set(p) == {"ref", "gen", "cosine", "style", "aas"}
        for m in ("cosine", "style", "aas"):
            assert -1.0 - 1e-5 <= p[m] <= 1.0 + 1e-5
    # per reference: mean/std/count agree with the pairs; bird has no generated image -> absent
    assert {Path(k).name for k in r["per_reference"]} == {"cat.png", "dog.png", "tree.png"}
    for ref, summ in r["per_reference"].items():
        for m in ("cosine", "style", "aas"):
            vals = np.array([p[m] for p in r["pairs"] if p["ref"] == ref])
            assert summ[m]["count"] == len(vals) == len(expected[Path(ref).stem])
            assert summ[m]["mean"] == pytest.approx(vals.mean(), abs=1e-6)
            assert summ[m]["std"] == pytest.approx(vals.std(), abs=1e-6)
    for m in ("cosine", "style", "aas"):
        allv = np.array([p[m] for p in r["pairs"]])
        assert r["overall"][m]["count"] == n_pairs
        assert r["overall"][m]["mean"] == pytest.approx(allv.mean(), abs=1e-6)
    assert {Path(u).name for u in r["unmatched"]} == {"orphan.png", "catalog.png", "x.png"}
    assert r["failed"] == []
    # the stem-equal copy of the reference is identical content: cosine and AAS ~1
    same = next(p for p in r["pairs"] if Path(p["gen"]).name == "cat.png")
    assert same["cosine"] == pytest.approx(1, abs=1e-4) and same["aas"] == pytest.approx(1, abs=1e-4)

    # HTML: one row per pair, two inline thumbnails per row
    page = out_html.read_text()
    pairs_part = page.split("<h2>pairs</h2>", 1)[1]
    assert pairs_part.count("<tr>") == n_pairs + 1  # + header row
    assert len(re.findall(r'<img [^>]*src="data:image/jpeg;base64,[A-Za-z0-9+/=]{100,}"', pairs_part)) == 2 * n_pairs
    assert "http://" not in page and "https://" not in page and "file://" not in page  # self-contained
    assert r["config"]["weights"] in page

    # CSV: the same per-pair numbers
    code, out, err = cli("score", "--ref", refs, "--gen", gen, "--model", tiny12, "--out", out_csv)
    assert code == 0, err
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ref", "gen", "cosine", "style", "aas"]
    assert len(rows) == n_pairs
    for row, p in zip(rows, r["pairs"]):
        assert (row["ref"], row["gen"]) == (p["ref"], p["gen"])
        for m in ("cosine", "style", "aas"):
            assert float(row[m]) == p[m]  # deterministic, to the last bit, in a fresh run


def test_score_single_reference_pairs_csv_and_metric_choice(cli, named, tiny12, tmp_path):
    refs, gen, _ = named
    out_json = tmp_path / "one.json"
    code, out, err = cli("score", "--ref", refs / "dog.png", "--gen", gen, "--model", tiny12, "--metric", "cosine",
                         "--out", out_json)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert set(r["metrics"]) == {"cosine"} and set(r["pairs"][0]) == {"ref", "gen", "cosine"}
    assert len(r["pairs"]) == 9 and r["unmatched"] == []
    assert list(r["per_reference"]) == [str((refs / "dog.png").absolute())]
    assert "overall" in out  # the table

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("ref,gen\ncat.png,tree/a.png\nbird.png,orphan.png\ncat.png,cat.png\n")
    code, out, err = cli("score", "--ref", refs, "--gen", gen, "--pairs", csv_path, "--model", tiny12,
                         "--metric", "aas,cosine", "--out", out_json, "--all-pairs")
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert [(Path(p["ref"]).name, Path(p["gen"]).name) for p in r["pairs"]] == [
        ("cat.png", "a.png"), ("bird.png", "orphan.png"), ("cat.png", "cat.png")]  # the CSV wins
    assert set(r["metrics"]) == {"aas", "cosine"}
    assert r["per_reference"][str((refs / "cat.png").absolute())]["aas"]["count"] == 2


def test_score_is_deterministic_library(named, tiny12):
    refs, gen, _ = named
    runs = []
    for _ in range(2):
        report, fs = score(refs, gen, all_pairs=True, model=str(tiny12))
        fs.close()
        runs.append(report.to_dict())
    assert runs[0]["pairs"] == runs[1]["pairs"]
    assert runs[0]["overall"] == runs[1]["overall"]
    assert runs[0]["config"] == runs[1]["config"]


def test_score_cli_bad_input(cli, named, tmp_path, tiny12):
    refs, gen, _ = named

    def bad(*args, words=()):
        code, out, err = cli("score", *map(str, args))
        assert code != 0, err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
        for w in words:
            assert w in lines[0], (w, lines[0])

    bad("--ref", tmp_path / "nope", "--gen", gen, words=["nope"])
    bad("--ref", refs, "--gen", tmp_path / "nope", words=["nope"])
    (tmp_path / "empty").mkdir()
    bad("--ref", refs, "--gen", tmp_path / "empty", words=["no images"])
    bad("--ref", tmp_path / "empty", "--gen", gen, words=["no images"])
    bad("--ref", refs, "--gen", gen, "--metric", "lpips", words=["lpips"])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("reference,generated\ncat.png,orphan.png\n")
    bad("--ref", refs, "--gen", gen, "--pairs", wrong, words=["ref,gen"])
    bad("--ref", refs, "--gen", gen, "--pairs", tmp_path / "missing.csv", words=["missing.csv"])
    other = tmp_path / "other"
    other.mkdir()
    photo("horse").save(other / "zebra.png")
    bad("--ref", refs, "--gen", other, words=["pass --pairs (a CSV of ref,gen), or --all-pairs"])


@pytest.mark.slow
def test_score_console_script_bad_input(tmp_path):
    p = run_cli("score", "--ref", tmp_path / "nope", "--gen", tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]


# -- known answers on the embedded model -------------------------------------------------------------
@pytest.mark.slow
def test_identical_copy_scores_one_and_above_a_different_image(tmp_path, embedded_model):
    refs, gen = tmp_path / "refs", tmp_path / "gen"
    refs.mkdir()
    gen.mkdir()
    for name, other in (("chelsea", "rocket"), ("astronaut", "coins")):
        src = EXAMPLES / f"{name}.jpg"
        shutil.copy2(src, refs / f"{name}.jpg")
        shutil.copy2(src, gen / f"{name}.jpg")  # identical bytes under another path
        photo(other, (320, 240)).save(gen / f"{name}_other.png")
        photo(name, (320, 240)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(gen / f"{name}_flip.png")
    report, fs = score(refs, gen, model=embedded_model)
    try:
        by = {(Path(p["ref"]).stem, Path(p["gen"]).stem): p for p in report.pairs}
        assert len(by) == 6 and report.unmatched == []
        for name in ("chelsea", "astronaut"):
            same, flip, other = by[(name, name)], by[(name, f"{name}_flip")], by[(name, f"{name}_other")]
            for m in ("cosine", "style", "aas"):
                assert same[m] == pytest.approx(1.0, abs=1e-3), (name, m, same[m])
                assert same[m] > other[m] + 0.05, (name, m, same[m], other[m])
            # a mirrored copy is closer in content than an unrelated photo
            assert flip["cosine"] > other["cosine"] + 0.05
        assert report.config["descriptors"]["model"] == embedded_model
        html = write_score_html(report, fs, tmp_path / "r.html").read_text()
        assert html.count("data:image/jpeg;base64,") >= 12
    finally:
        fs.close()


def test_relative_paths_with_dotdot(cli, named, tiny12, monkeypatch):
    """`cd refs && simsearch score --ref ../refs --gen ../gen`: the indexer and the pairing must spell
    every path the same way (it crashed with IndexError when one used abspath and the other absolute())."""
    refs, gen, expected = named
    monkeypatch.chdir(refs)
    code, out, err = cli("score", "--ref", "../refs", "--gen", "../gen", "--metric", "cosine", "--model", tiny12,
                         "--out", "../report.json")
    assert code == 0, err
    report = json.loads((refs.parent / "report.json").read_text())
    assert len(report["pairs"]) == sum(len(v) for v in expected.values())
    assert all(".." not in p["ref"] and ".." not in p["gen"] for p in report["pairs"])
    assert rel_pairs([(p["ref"], p["gen"]) for p in report["pairs"]], refs, gen) == rel_pairs(
        make_pairs(refs, gen)[0], refs, gen)


def test_aas_reads_attention_inputs_from_a_file_computed_in_chunks(tmp_path, new_index, monkeypatch):
    """The attention inputs AAS scores pairs from are computed QKV_CHUNK images at a time (3 here,
    of 8) into one float32 file and read memory-mapped; every pair's AAS is the one computed directly
    from the stored dense tensors with the backbone's projections, and `close` removes the file."""
    import numpy as np
    import torch

    from conftest import TINY, write_patterns
    from simsearch.bench import features
    from simsearch.rerank.aas import aligned_attention_score
    from simsearch.store import path_key

    monkeypatch.setattr(features, "QKV_CHUNK", 3)
    paths = write_patterns(tmp_path / "imgs", 8)
    model = new_index(tmp_path / "unused").conf.model
    fs = features.FeatureSet(paths, model=model, device="cpu", **{k: v for k, v in TINY.items()})
    i, j = np.triu_indices(8, k=1)
    got = fs.pair_scores("aas", i, j)
    scratch = next(Path(fs._scratch.name).glob("*.npy"))
    bb, layer = fs.index.embedder.backbone, fs.index.conf.dense_layer
    with torch.inference_mode():
        q, k, v = bb.attention_inputs(layer, torch.as_tensor(fs.index.dense([path_key(str(p)) for p in fs.paths])))
        want = [float(aligned_attention_score((q[a:a + 1], k[a:a + 1], v[a:a + 1]), (q[b:b + 1], k[b:b + 1], v[b:b + 1]))[0])
                for a, b in zip(i, j)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert scratch.stat().st_size >= 4 * 4 * q.numel()  # q, k, v and own, float32, every image
    fs.close()
    assert not scratch.exists()
