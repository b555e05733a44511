-- issue 17, reputation at the edge: the iprev verdict (RFC 8601 section 3) of the
-- connection a message came in on: pass / fail / temperror / permerror; NULL when not
-- computed (provider webhooks, edge.iprev off, outbound rows). The same verdict is in
-- auth_results as "iprev=..."; the column is for queries and the spam stage.
ALTER TABLE messages ADD COLUMN iprev text;
