"""End-to-end tests of the server: HTTP API, live uvicorn, browser, scheduler."""
