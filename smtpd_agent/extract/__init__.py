"""Text an LLM can use: a message's new text (reply.py), HTML as text (html_text.py), and an
attachment's text on request (attachment.py, PDFs in a child process: pdf.py).

Place: the standards layer. Pure functions over bytes and strings, every one bounded in
input and output; nothing here knows SMTP sessions, the store or HTTP.
"""
