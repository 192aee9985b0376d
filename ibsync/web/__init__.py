"""The local web app (``ibsync ui``, and served by the agent): Starlette pages rendered on the
server, a little vanilla JavaScript, every asset inside the package."""
