//! The tenant: a fresh UUID per test that scopes the test's rows.

use std::fmt;

use uuid::Uuid;

/// A fresh, random tenant id for one test.
///
/// Every connection of the test's pool carries it as the session setting
/// `pgtest.tenant_id` ([`Tenant::SETTING`]), so SQL can read it with
/// `current_setting('pgtest.tenant_id')` (in a column default or a
/// row-level-security policy) and Rust code can bind [`Tenant::id`].
///
/// ```
/// use pgtest_runtime::Tenant;
///
/// let tenant = Tenant::new();
/// assert_eq!(tenant.to_string(), tenant.id().to_string());
/// assert_ne!(tenant, Tenant::new());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Tenant {
    id: Uuid,
}

impl Tenant {
    /// The session setting that holds the tenant id on every connection of
    /// the test's pool.
    pub const SETTING: &'static str = "pgtest.tenant_id";

    /// A new tenant with a random (version 4) UUID.
    pub fn new() -> Self {
        Self { id: Uuid::new_v4() }
    }

    /// The tenant's id.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id.fmt(f)
    }
}
