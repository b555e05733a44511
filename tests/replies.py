"""Replies as common mail clients write them, each with the new text it carries.

Shared by the pure tests (tests/unit/test_extract.py) and the SMTP-to-API tests
(tests/http/test_content_api.py). QUOTED is a phrase that appears only in the quoted
history or the signature, never in the new text.
"""

from __future__ import annotations

from dataclasses import dataclass

QUOTED = "PURPLE ELEPHANT"


@dataclass(frozen=True)
class Reply:
    client: str
    new: str  # what extracted_text must hold (and nothing of QUOTED)
    text: str | None = None
    html: str | None = None


GMAIL = Reply("gmail", "Thanks, Thursday works for me.", text=f"""\
Thanks, Thursday works for me.

On Mon, Nov 30, 2026 at 9:14 AM Alice Smith <alice@example.com> wrote:
> Can we meet on Thursday? {QUOTED}
>
> Alice
""")

APPLE = Reply("apple mail", "Sounds good, see you then.", text=f"""\
Sounds good, see you then.

Sent from my iPhone

> On 30 Nov 2026, at 09:14, Alice Smith <alice@example.com> wrote:
>\x20
> Can we meet on Thursday? {QUOTED}
""")

OUTLOOK_DESKTOP = Reply("outlook desktop", "Yes, the invoice is attached.", text=f"""\
Yes, the invoice is attached.

-----Original Message-----
From: Alice Smith <alice@example.com>
Sent: Monday, November 30, 2026 9:14 AM
To: Bob <bob@example.org>
Subject: Invoice

Could you send the invoice? {QUOTED}
""")

OUTLOOK_HEADERS = Reply("outlook desktop, header block only", "Yes, it ships today.", text=f"""\
Yes, it ships today.

From: Alice Smith <alice@example.com>
Sent: Monday, November 30, 2026 9:14 AM
To: Bob <bob@example.org>
Subject: Order

Does it ship today? {QUOTED}
""")

OUTLOOK_WEB = Reply("outlook web", "Thursday is fine.", html=f"""\
<html><head><style>p {{ margin: 0 }}</style></head><body>
<div dir="ltr">Thursday is <b>fine</b>.</div><div><br></div>
<div id="appendonsend"></div><hr style="display:inline-block;width:98%" tabindex="-1">
<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri" color="#000000"><b>From:</b> Alice
Smith &lt;alice@example.com&gt;<br><b>Sent:</b> Monday, November 30, 2026 9:14 AM<br>
<b>To:</b> Bob<br><b>Subject:</b> Meeting</font><div>&nbsp;</div></div>
<div dir="ltr"><div>Can we meet on Thursday? {QUOTED}</div></div></body></html>
""")

THUNDERBIRD = Reply("thunderbird", "I agree with the plan.", text=f"""\
I agree with the plan.

On 11/30/26 9:14 AM, Alice Smith wrote:
> Here is the plan. {QUOTED}
> Step one.
""")

GMAIL_HTML = Reply("gmail html", "Works for me.", html=f"""\
<div dir="ltr">Works for me.</div><br><div class="gmail_quote gmail_quote_container">\
<div dir="ltr" class="gmail_attr">On Mon, Nov 30, 2026 at 9:14 AM Alice Smith \
&lt;<a href="mailto:alice@example.com">alice@example.com</a>&gt; wrote:<br></div>\
<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex">Can we meet? {QUOTED}\
</blockquote></div>
""")

SIGNATURE = Reply("signature", "Please ship it on Friday.", text=f"""\
Please ship it on Friday.

--\x20
Bob Example
{QUOTED} Corp | +1 555 0100
""")

NO_QUOTES = Reply("no quotes", "Hello,\n\nI would like to order three widgets.\n\nThanks\nCarol",
                  text="Hello,\n\nI would like to order three widgets.\n\nThanks\nCarol\n")

REPLIES = (GMAIL, APPLE, OUTLOOK_DESKTOP, OUTLOOK_HEADERS, OUTLOOK_WEB, THUNDERBIRD, GMAIL_HTML,
           SIGNATURE, NO_QUOTES)
