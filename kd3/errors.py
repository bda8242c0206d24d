"""User-facing errors: the CLI prints them as one line and exits 2, without a traceback."""

import re


class Kd3Error(Exception):
    """A problem with the user's input (config, file, URL list, checkpoint) that they can fix."""


class ConfigError(Kd3Error):
    """Invalid configuration: names the key and the file."""


class RunFolderError(Kd3Error):
    """A stage's output folder is in a state the requested mode refuses (e.g. non-empty)."""


def load_error_reason(exc: BaseException) -> str:
    """One line from a torch.load failure: the refused class for pickled objects, else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's message carries terminal bold codes
    refused = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if refused:
        return (f"it contains a pickled {refused.group(1)} object, and arbitrary objects are never unpickled "
                "(torch.load weights_only=True)")
    if text.startswith("Weights only load failed"):
        # torch's advice (re-run with weights_only=False) is exactly what kd3 never does; keep its diagnosis only
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.DOTALL)
        what = f" ({' '.join(detail.group(1).split())})" if detail else ""
        return (f"it holds pickled data that a weights-only load refuses{what}, and arbitrary objects are never "
                "unpickled (torch.load weights_only=True)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # "Error(s) in loading state_dict for CLIP:" alone says nothing; the next line names the keys
    first = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return first[:240] + (" …" if len(first) > 240 else "")
