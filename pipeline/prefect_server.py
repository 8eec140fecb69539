"""Which Prefect API this process reports to, checked before any Prefect work (``xlm flow``, task_runner: prefect).

Prefect 3 runs no flow without an API: a configured server that does not answer ends in a long traceback after
minutes of retries. Asking first turns that into one line that says what to start or change.
"""
from __future__ import annotations

from pipeline.errors import PipelineError


def check_prefect_api(fix: str) -> str:
    """One line saying where this run reports to; PipelineError ending in ``fix`` when no server answers there."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.api.url
    if not url:
        if not settings.server.ephemeral.enabled:
            raise PipelineError("no Prefect server configured: set PREFECT_API_URL (see prefect.toml) or "
                                "PREFECT_SERVER_EPHEMERAL_ENABLED=true")
        return ("PREFECT_API_URL is empty: using a temporary local Prefect server; the run is stored in "
                f"{settings.home} and shows up in the UI once you run `prefect server start`")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise PipelineError(f"no Prefect server answers at {url} ({type(problem).__name__}: {problem}); {fix}")
    return f"reporting to the Prefect server at {url} (UI: {url.removesuffix('/api')})"
