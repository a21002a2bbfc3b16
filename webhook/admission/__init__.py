"""The AdmissionReview envelope (`review`) and its partial wire decoding (`wire`): bytes in,
bytes out, around `webhook.core`. It may import the core and the ambassador, never the
server (`webhook.serving`) or the Kubernetes client (`webhook.cluster`).
"""
