"""Developer tools that are not part of the webhook: run from the repository's root."""
