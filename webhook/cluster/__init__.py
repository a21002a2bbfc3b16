"""Code that talks to the Kubernetes API: `outrigger register` and `outrigger audit`. It may
import every layer below the CLI (it reads the serving certificates' CA); only the CLI
imports it.
"""
