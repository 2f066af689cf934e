"""personae.chat: talking to a character — the interactive terminal session.

Cards and prompt assembly live in `personae.data` (training reads them too) and generation in
`personae.models.generation` (evaluation generates too); the dependency rule lets chat use both.
"""
