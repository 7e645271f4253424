"""sdlab serve: the web UI's API (/sdapi/v1), sdlab's own (/api/v1), the job queue and the web page; app.create_app builds it."""
