"""The running server: the ASGI app, uvicorn with TLS, serving-certificate and policy reload,
background tasks, metrics and development certificates. It may import admission, core and
ambassador; never `webhook.cluster` or the CLI.
"""
