import numpy as np
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
    with pytest.raises(ValueError, match="neither a shipped set") as info:
        data.load_prompts("no_such_dataset_xyz", data_dir=str(tmp_path))
    # tfds' reason in one line, not its list of the hundreds of datasets it knows
    assert "no_such_dataset_xyz not found" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'chat'"):
        data.load_prompts("chatt", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        data.load_prompts(str(tmp_path / "missing.txt"))


def test_a_known_but_unprepared_tfds_dataset_is_an_error_not_a_download(tmp_path):
    # tfds.data_source downloads and prepares a catalogue dataset by default: offline that is
    # minutes of retries before a network error; a researcher's run must say at once that it
    # is not prepared, and fetch nothing.
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match=r"nor a TFDS dataset with split 'train' prepared in data_dir=.*tfds"):
        data.load_prompts("imdb_reviews", data_dir=str(data_dir))
    assert not (data_dir / "downloads").exists()


_TEXT_BUILDER = None


def _prepare_text_dataset(data_dir, texts_by_split):
    """A TFDS dataset "fdrl_test_texts" with one "text" feature, written as array_record."""
    global _TEXT_BUILDER
    import tensorflow_datasets as tfds

    if _TEXT_BUILDER is None:
        class FdrlTestTexts(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(texts) for split, texts in self.texts_by_split.items()}

            def _generate_examples(self, texts):
                for i, text in enumerate(texts):
                    yield i, {"text": text, "label": i}

        _TEXT_BUILDER = FdrlTestTexts
    builder = _TEXT_BUILDER(data_dir=str(data_dir), file_format="array_record")
    builder.texts_by_split = texts_by_split
    builder.download_and_prepare()
    return builder.name


def test_a_prepared_tfds_dataset_by_name_split_and_field(tmp_path):
    name = _prepare_text_dataset(tmp_path, {"train": ["a", "b", "c"], "validation": ["Say hi.", "Say bye."]})
    prompts = data.load_prompts(name, split="validation", field="text", data_dir=str(tmp_path))
    assert sorted(prompts) == ["Say bye.", "Say hi."]
    assert len(data.load_prompts(name, field="text", data_dir=str(tmp_path), limit=2)) == 2
    with pytest.raises(ValueError, match=r"has no field 'prompt'; its fields are \['label', 'text'\]"):
        data.load_prompts(name, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="split 'test'"):
        data.load_prompts(name, split="test", field="text", data_dir=str(tmp_path))

    # the same through an LM config's fields, as train.py and sample.py read them
    from configs import smollm2_sentiment
    from fdrl import train

    config = smollm2_sentiment.get_config("smoke")
    config.prompts, config.prompts_split, config.prompts_field = name, "validation", "text"
    config.prompts_data_dir = str(tmp_path)
    assert sorted(train.load_config_prompts(config)) == ["Say bye.", "Say hi."]
    assert len(train.load_config_prompts(config, limit=1)) == 1


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
