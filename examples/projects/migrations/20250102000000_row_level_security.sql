-- The role the application connects as. Roles belong to the whole server,
-- so create it only when no other database (or a concurrent migration) has.
do $$
begin
    create role app_user nologin;
exception
    when duplicate_object or unique_violation then null;
end
$$;

grant app_user to current_user;
grant select, insert, update on orgs, projects to app_user;

-- As app_user, a session sees only the projects of the org named by the
-- session setting pgtest.tenant_id (pgtest sets it on every connection of
-- a test; the application sets it per request).
alter table projects enable row level security;
create policy projects_of_current_org on projects
    using (org_id = nullif(current_setting('pgtest.tenant_id', true), '')::uuid)
    with check (org_id = nullif(current_setting('pgtest.tenant_id', true), '')::uuid);
