create table orgs (
    id uuid primary key,
    name text not null
);

create table projects (
    id bigint generated always as identity primary key,
    org_id uuid not null references orgs (id),
    name text not null,
    archived boolean not null default false,
    unique (org_id, name)
);
