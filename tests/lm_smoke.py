"""The smoke variant of an LM config (the tiny random model), writing to a test's folder."""


def smoke(module, tmp_path, **overrides):
    config = module.get_config("smoke")
    config.workdir = str(tmp_path)
    config.update(overrides)
    return config
