"""Stage 6 of the pipeline: an agent answers the mail stored for it.

`store` creates one job per inbound message (in its own transaction); the
workers here claim jobs from Postgres, decide whether a reply is allowed
(`policy`), build the prompt (`prompt`), call the Messages API (`llm`), compose
the reply (`compose`) and store it in the thread as an outbound message with
status `queued` for the outbound stage.
"""
