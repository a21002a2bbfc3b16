"""Code that talks to the Kubernetes API (`outrigger register`). It may import every layer
below the CLI (it reads the serving certificates' CA); nothing but the CLI imports it.
"""
