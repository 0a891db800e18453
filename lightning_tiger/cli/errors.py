"""Configuration errors of ``lightning-tiger`` explained for humans: ``file: key: problem`` plus the signature of
the class at fault, from jsonargparse's messages and the traceback of the constructor that raised."""

from __future__ import annotations

import difflib
import re
import traceback
from collections.abc import Iterator

from lightning.pytorch import Trainer

from .sources import COMMAND_LINE, config_sources, import_class, parameters_of, signature_of, who_set

__all__ = ["ConfigConflictWarning", "ConfigError", "explain_config_error"]


class ConfigError(Exception):
    """A configuration that cannot be parsed or instantiated, explained for humans.

    Attributes:
        key: the dotted config key at fault (``model.init_args.hidden``), or ``None`` when unknown.
        files: the config files that set it (the last one wins), or the command line.
    """

    def __init__(self, message: str, key: str | None = None, files: list[str] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.files = files or []


class ConfigConflictWarning(UserWarning):
    """A configured value that has no effect because another setting replaces the code that would read it."""


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _raising_section(exc: BaseException, candidates: dict[str, str]) -> str | None:
    """The config key of the class whose constructor raised ``exc``, read from the traceback.

    The innermost ``__init__`` frame whose ``self`` is an instance of a configured class identifies it: an
    optimizer's ``lr`` check is blamed on ``optimizer`` even when the model also has an ``lr`` parameter.
    """
    classes = [(key, cls) for key, path in candidates.items() if (cls := import_class(path)) is not None]
    found = None
    for link in _exception_chain(exc):
        for frame, _ in traceback.walk_tb(link.__traceback__):
            owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
            if owner is None:
                continue
            exact = [key for key, cls in classes if type(owner) is cls]
            matches = exact or [key for key, cls in classes if isinstance(owner, cls)]
            if matches:
                found = matches[0]
        if found is not None:
            return found
    return None


# jsonargparse's union bookkeeping lines, which are not the problem itself.
_BOOKKEEPING = r"Parser key|Does not validate|Subtypes:|Errors:|Given value|NoneType|class_path '"


def explain_config_error(
    exc: BaseException, argv: list[str], candidates: dict[str, str] | None = None
) -> ConfigError:
    """Turn a jsonargparse / constructor error into a short message naming file, key and accepted values.

    Args:
        exc: what parsing or instantiation raised.
        argv: the command-line arguments (to find the ``--config`` files and command-line overrides).
        candidates: config key -> class_path of the classes that were being instantiated (``{"model":
            "pkg.Model", "model.init_args.net": "pkg.Net", "optimizer": "torch.optim.AdamW"}``); the one whose
            constructor raised is found in the traceback, the parameter from the message.

    Returns:
        A :class:`ConfigError` whose message reads ``file: key: problem`` followed by what is accepted.
    """
    sources = config_sources(argv)
    text = str(exc)
    missing = re.search(r"Missing mandatory value: ([\w.]+)", text)
    if missing:  # a `???` in a config file that nobody filled in
        key = re.sub(r"^(fit|validate|test|predict)\.", "", missing.group(1))
        where = who_set(key, sources)
        files = [where] if where else [name for name, _ in sources if name != COMMAND_LINE]
        message = f"{', '.join(files) or '<config>'}: {key}: required value missing (`???`); set it with --{key}=..."
        return ConfigError(message, key=key, files=files)
    unrecognized = re.search(r"unrecognized arguments: (\S+)", text)
    if unrecognized:  # argparse's own report; prefixes are off, so `--trainer.max_step` lands here
        key = unrecognized.group(1).lstrip("-").split("=", 1)[0]
        section, _, leaf = key.rpartition(".")
        known = [p.name for p in parameters_of(f"{Trainer.__module__}.{Trainer.__qualname__}")] \
            if section == "trainer" else []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean {section}.{close[0]}?" if close else ""
        message = f"{COMMAND_LINE}: {key}: unknown option (prefixes of option names are not accepted){hint}"
        return ConfigError(message, key=key, files=[COMMAND_LINE])
    keys = [re.sub(r"^(fit|validate|test|predict)\.", "", k) for k in re.findall(r'Parser key "([^"]+)"', text)]
    class_paths = re.findall(r"class_path '([^']+)'", text)
    unknown = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text) or re.search(
        r"No action for key \"?([\w.]+)\"?", text
    )
    problem_lines = [
        line.strip(" -") for line in text.splitlines() if line.strip() and not re.search(_BOOKKEEPING, line)
    ]
    problem = problem_lines[0] if problem_lines else text.splitlines()[0] if text else type(exc).__name__
    leaf = unknown.group(1) if unknown else (keys[-1] if len(keys) > 1 else None)
    section = keys[0] if keys else None
    if section is None and candidates:  # a constructor's own ValueError/TypeError
        section = _raising_section(exc, candidates)
        if section is not None:
            class_paths = [candidates[section]]
            params = [p.name for p in parameters_of(candidates[section]) if p.kind not in (p.VAR_POSITIONAL,
                                                                                            p.VAR_KEYWORD)]
            leaf = next((p for p in params if re.search(rf"\b{re.escape(p)}\b", problem)), None)
    if section is not None and "." in section and leaf is None and not class_paths:
        section, leaf = section.rpartition(".")[0], section.rpartition(".")[2]  # a plain key such as trainer.x
    key = ".".join(k for k in [section, "init_args" if class_paths and leaf else None, leaf] if k)
    where = (who_set(key, sources) if key else None) or (
        who_set(f"{section}.class_path", sources) if section else None
    )
    files = [where] if where else []
    lines = [f"{where or '<defaults>'}: {key or '<config>'}: {problem}"]
    accepted = signature_of(class_paths[-1] if class_paths else None)
    if accepted:
        lines.append(f"  accepted: {accepted}")
    lines.append("  (run with --help, or `--print_config` to see the merged configuration)")
    return ConfigError("\n".join(lines), key=key or None, files=files)
