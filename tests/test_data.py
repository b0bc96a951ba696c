import pytest

from fdrl import data


def test_shipped_sets_and_text_files_through_tfds(tmp_path):
    assert {"chat", "biographies"} <= set(data.shipped_prompt_sets())
    chat = data.load_prompts("chat")
    assert len(chat) == 16 and "Tell me about your day." in chat
    path = tmp_path / "mine.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    assert sorted(data.load_prompts(str(path), data_dir=str(tmp_path / "tfds"))) == ["first prompt", "second prompt"]
    assert len(data.load_prompts("chat", limit=3)) == 3


def test_preparing_a_file_prints_one_line_not_a_download(tmp_path, capsys):
    path = tmp_path / "quiet.txt"
    path.write_text("a prompt\n")
    data.prepare_text_file(str(path), data_dir=str(tmp_path / "tfds"))
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and "written once as an array_record TFDS dataset" in out.out, out
    assert "Downloading" not in out.out + out.err
    data.prepare_text_file(str(path), data_dir=str(tmp_path / "tfds"))  # prepared already: nothing printed
    assert capsys.readouterr().out == ""


def test_a_failed_preparation_shows_what_tfds_printed(tmp_path, capsys, monkeypatch):
    warm = tmp_path / "warm.txt"
    warm.write_text("x\n")
    data.prepare_text_file(str(warm), data_dir=str(tmp_path / "warm"))  # builds the builder class

    def failing_prepare(self, *args, **kwargs):
        print("tfds: preparing")
        raise RuntimeError("disk full")

    monkeypatch.setattr(data._BUILDER, "download_and_prepare", failing_prepare)
    path = tmp_path / "fails.txt"
    path.write_text("a prompt\n")
    with pytest.raises(RuntimeError, match="disk full"):
        data.prepare_text_file(str(path), data_dir=str(tmp_path / "tfds"))
    assert "tfds: preparing" in capsys.readouterr().err


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped set"):
        data.load_prompts("no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        data.load_prompts(str(tmp_path / "missing.txt"))


def test_concurrent_preparations_of_one_file_prepare_it_once(tmp_path, monkeypatch):
    # A second caller checks while the first is inside download_and_prepare (as in an f sweep
    # launched in parallel): it must wait for the first, not prepare a second copy whose rename fails.
    import threading

    path = tmp_path / "sweep.txt"
    path.write_text("a prompt\nanother\n")
    warm = tmp_path / "warm.txt"
    warm.write_text("x\n")
    data.prepare_text_file(str(warm), data_dir=str(tmp_path / "warm"))  # builds the builder class
    builder_class = data._BUILDER
    original = builder_class.download_and_prepare
    started, calls = threading.Event(), []

    def slow_prepare(self, *args, **kwargs):
        calls.append(1)
        started.set()
        threading.Event().wait(1.0)  # the other caller checks for the dataset meanwhile
        return original(self, *args, **kwargs)

    monkeypatch.setattr(builder_class, "download_and_prepare", slow_prepare)
    errors = []

    def first():
        try:
            data.prepare_text_file(str(path), data_dir=str(tmp_path / "tfds"))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    second_dir = data.prepare_text_file(str(path), data_dir=str(tmp_path / "tfds"))
    thread.join()
    assert not errors and len(calls) == 1
    assert sorted(data.load_prompts(str(path), data_dir=str(tmp_path / "tfds"))) == ["a prompt", "another"]
    assert second_dir.startswith(str(tmp_path / "tfds"))
