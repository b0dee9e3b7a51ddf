"""Every config file a command names is read strictly before the command parses it: a YAML syntax error names
its file and line, and a key written twice (YAML keeps the last one silently) is refused naming the key, its
lines and the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from user_errors import UserError


class ConfigFileError(UserError):
    """A config file that cannot be read, is not UTF-8 YAML, or sets a key twice."""


def check_config_files(args: list[str]) -> None:
    """Read every config file of the arguments (`--config` and any `--<key> file.yaml`, and the files they
    compose)."""
    pairs = [*zip(args, args[1:], strict=False),  # `--config file` and `--config=file`
             *(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)]
    files = [value for flag, value in pairs
             if flag.startswith("--") and (flag == "--config" or value.endswith((".yaml", ".yml")))]
    seen: set[Path] = set()
    while files:
        path = Path(files.pop())
        if not path.is_file() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        document = read_yaml_strictly(path)
        # LightningCLI composes sections given as file names relative to the including file.
        if isinstance(document, dict):
            for value in document.values():
                if isinstance(value, str) and value.endswith((".yaml", ".yml")):
                    files.append(str(path.parent / value))


def read_yaml_strictly(path: Path) -> Any:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigFileError(f"{path} sets {key!r} twice (lines {lines[key]} and {line}); YAML would "
                                          "silently keep the last one: merge them into one")
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as error:  # e.g. Latin-1 from an old editor: YAML files are UTF-8
        byte = error.object[error.start]
        raise ConfigFileError(f"config file {path} is not UTF-8 text (byte {error.start} is 0x{byte:02x}); "
                              "save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise ConfigFileError(f"{path} is not valid YAML{where}: {problem}") from None
    except OSError as error:
        raise ConfigFileError(f"config file {path} cannot be read: {error.strerror}") from None
