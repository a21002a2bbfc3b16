"""The ambassador: its typed configuration (`spec`), `host:port` upstream values (`hostport`)
and the Envoy bootstrap built from them (`envoy`). Pure; imports nothing else of `webhook`.
"""
