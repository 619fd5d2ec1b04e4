create table jobs (
    id bigint generated always as identity primary key,
    batch text not null,
    worker int not null,
    unique (batch, worker)
);
