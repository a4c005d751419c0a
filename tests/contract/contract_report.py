"""The runner both contract scripts end with (``sglang_contract.py``, ``vllm_contract.py``): every
``check_*`` function runs, none stops the others, and one JSON object ``{"version": ..., check: "ok" | detail
| failure text}`` is printed as the last line for ``tests/test_contract_engines.py`` to read."""

import json
import traceback


def run_checks(namespace: dict, *, version: str) -> None:
    """Run every ``check_*`` callable of ``namespace`` (a script's ``globals()``) in definition order."""
    results = {"version": version}
    for name, fn in [(n, f) for n, f in namespace.items() if n.startswith("check_") and callable(f)]:
        try:
            detail = fn()
            results[name] = detail if isinstance(detail, str) else "ok"
        except BaseException:  # noqa: BLE001 - every check reports, none stops the others
            results[name] = traceback.format_exc()[-4000:]
    print(json.dumps(results))
