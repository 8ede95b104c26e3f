"""Data found the way users have it: ``--data``/``$LOWBIT_DATA``, the project's ``shared/data``, or the Hugging
Face datasets cache (a local folder laid out as that cache; nothing is downloaded). Data found nowhere is one
error naming the three ways, before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest
from test_cli import invoke, no_loading, one_error_line  # noqa: F401  (no_loading is a fixture)

import lowbit.data as data_mod
from lowbit.errors import LowbitError
from lowbit.eval.tasks import load_task

WIKI = ["", " = Title = \n", "", " Some text of the article . \n", ""]


def write_datasets_cache(cache, repo: str, config: str | None, split: str, rows: list[dict]) -> None:
    """One split as ``datasets`` caches a Hub dataset: ``{namespace}___{name}/{config}/0.0.0/{hash}/`` with
    ``{name}-{split}.arrow`` and ``dataset_info.json``."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    namespace, name = repo.split("/")
    folder = cache / f"{namespace}___{name}" / (config or "default") / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(rows).data.table
    with ArrowWriter(path=str(folder / f"{name}-{split}.arrow")) as writer:
        writer.write_table(table)
        writer.finalize()
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {
        "features": datasets.Dataset.from_list(rows).features.to_dict(), "builder_name": "parquet",
        "dataset_name": name, "config_name": config or "default",
        "version": {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0}, "splits": {}}
    info["splits"][split] = {"name": split, "num_bytes": 1, "num_examples": len(rows), "dataset_name": name}
    info_path.write_text(json.dumps(info))


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """No data folder named, none in the project layout, an empty datasets cache, offline."""
    import datasets

    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setattr(data_mod, "project_dir", lambda: None)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    data_mod.use_data_dir(None)
    yield tmp_path / "hf-cache"
    data_mod.use_data_dir(None)


def test_data_found_nowhere_is_one_error_naming_the_three_ways(nowhere):
    with pytest.raises(LowbitError) as err:
        data_mod.wikitext2_rows("test")
    text = str(err.value)
    assert "\n" not in text
    assert "--data DIR" in text and "LOWBIT_DATA" in text and "shared/data" in text and "Salesforce/wikitext" in text


def test_the_datasets_cache_serves_wikitext_and_the_tasks(nowhere):
    write_datasets_cache(nowhere, "Salesforce/wikitext", "wikitext-2-raw-v1", "test", [{"text": t} for t in WIKI])
    write_datasets_cache(nowhere, "Salesforce/wikitext", "wikitext-2-raw-v1", "validation",
                         [{"text": t} for t in WIKI[:3]])
    assert data_mod.wikitext2_rows("test") == WIKI and data_mod.wikitext2_rows("valid") == WIKI[:3]
    arc = {"id": "x", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    write_datasets_cache(nowhere, "allenai/ai2_arc", "ARC-Easy", "test", [arc])
    boolq = {"question": "is it", "passage": "It is.", "idx": 0, "label": 1}
    write_datasets_cache(nowhere, "aps/super_glue", "boolq", "validation", [boolq])
    piqa = {"goal": "open a jar", "sol1": "twist", "sol2": "pull", "label": 0}
    write_datasets_cache(nowhere, "ybisk/piqa", None, "validation", [piqa])
    (example,) = load_task("arc_easy")
    assert example.gold == 1 and example.choices == ["a", "b"]
    (example,) = load_task("boolq")
    assert example.gold == 1 and example.context.startswith("It is.")
    (example,) = load_task("piqa")
    assert example.gold == 0 and example.choices == ["twist", "pull"]


def test_a_named_folder_wins_and_a_file_missing_there_is_an_error(nowhere, tmp_path, monkeypatch):
    folder = tmp_path / "mine" / "wikitext-2-raw"
    folder.mkdir(parents=True)
    (folder / "wiki.test.raw").write_text("".join(WIKI) or " \n")
    write_datasets_cache(nowhere, "Salesforce/wikitext", "wikitext-2-raw-v1", "validation", [{"text": "x\n"}])
    data_mod.use_data_dir(tmp_path / "mine")
    assert data_mod.wikitext2_path("test") == folder / "wiki.test.raw"
    with pytest.raises(LowbitError, match=r"wiki\.valid\.raw does not exist.*--data DIR"):
        data_mod.wikitext2_rows("valid")  # not silently taken from the cache: the user named a folder
    data_mod.use_data_dir(None)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "mine"))
    assert data_mod.wikitext2_path("test") == folder / "wiki.test.raw"


def test_the_project_layout_is_found_from_the_working_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    shared = tmp_path / "shared" / "data" / "wikitext-2-raw"
    shared.mkdir(parents=True)
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    assert data_mod.project_dir() == tmp_path / "shared" / "data"


@pytest.mark.parametrize("args", [
    ("quantize", "smollm2-135m", "--recipe", "rtn-w4g128", "--windows", "4"),
    ("quantize", "smollm2-135m", "--recipe", "gptq-w4g128", "--no-eval"),
    ("eval", "smollm2-135m", "--windows", "2"),
    ("eval", "smollm2-135m", "--tasks", "piqa"),
])
def test_cli_without_data_fails_before_loading_any_model(nowhere, no_loading, tmp_path, args):  # noqa: F811
    line = one_error_line(invoke(*args, *(["--out", tmp_path / "o"] if args[0] == "quantize" else []), "--json"))
    assert "data not found" in line and "--data DIR" in line and "Hugging Face datasets" in line, line
    assert no_loading == []


def test_cli_data_option_names_the_folder(nowhere, no_loading, tmp_path):  # noqa: F811
    (tmp_path / "d").mkdir()
    line = one_error_line(invoke("eval", "smollm2-135m", "--windows", "2", "--data", tmp_path / "d", "--json"))
    assert str(tmp_path / "d" / "wikitext-2-raw" / "wiki.test.raw") in line and "does not exist" in line
    line = one_error_line(invoke("eval", "smollm2-135m", "--data", tmp_path / "none", "--json"))
    assert "is not a folder" in line
    assert no_loading == []
    shutil.rmtree(tmp_path / "d")


def test_finetune_data_may_be_a_folder_to_take_wikitext_valid_from(nowhere, no_loading, ckpt, tmp_path):  # noqa: F811
    (tmp_path / "d" / "wikitext-2-raw").mkdir(parents=True)
    line = one_error_line(invoke("finetune", ckpt, "--out", tmp_path / "ft", "--data", tmp_path / "d", "--steps", "1",
                                 "--json"))
    assert str(tmp_path / "d" / "wikitext-2-raw" / "wiki.valid.raw") in line and "does not exist" in line, line
    assert no_loading == []


def test_an_unreachable_hub_is_not_waited_for(nowhere, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data_mod, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(LowbitError, match=r"WikiText-2 valid data not found \(the Hugging Face Hub is not reachable\)"):
        data_mod.wikitext2_rows("valid")
