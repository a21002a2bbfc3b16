"""The pure engine: annotations, parameters, policy, selection, templates, volumes, the
injector and the JSON patch. No HTTP, no server, no Kubernetes client: it may import only
`webhook.ambassador` (and libraries), so the webhook and `outrigger inject` share it.
"""
