"""`simsearch serve`: the web page and JSON API over a database, with the model kept warm."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._common import DEFAULT_DB, DbOption, DeviceOption, RuntimeOption, err, esc, note, quiet_libraries


def serve(
    db: DbOption = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback is reachable from other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest accepted upload, in MiB.")] = 20,
    cors: Annotated[Optional[list[str]], typer.Option(help="Allow this origin cross-origin requests (repeatable); none by default.")] = None,
    device: DeviceOption = "auto",
    runtime: RuntimeOption = "auto",
):
    """Serve a page (drop an image, see the hits) and a JSON API (docs at /docs) over the database."""
    from ..errors import EmptyIndexError
    from ..paths import database_exists

    if not database_exists(db):
        raise EmptyIndexError(f"{db}: no simsearch database here", db=db)
    import uvicorn

    from ..server import bind_warning, create_app

    quiet_libraries()
    warning = bind_warning(host, port)
    if warning:
        err.print(f"[bold red]{esc(warning)}[/]", highlight=False, soft_wrap=True)
    note(f"loading {db} ...")
    app = create_app(db, max_upload_mb=max_upload_mb, cors=cors or (), device=device, runtime=runtime)
    info = app.state.service.index.info()
    shown = f"[{host}]" if ":" in host else host
    note(f"{info['rows']} images, model {info['config']['model']}: open http://{shown}:{port} (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
