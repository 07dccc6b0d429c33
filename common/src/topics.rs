//! Kafka topic names. Every topic Fleet reads or writes is named here and nowhere else.

use crate::priority::Priority;
use crate::settings::TopicSettings;

/// Fleet's topics under one prefix (default `fleet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn from_settings(settings: &TopicSettings) -> Self {
        Self::new(settings.prefix.clone())
    }

    /// Where producers publish task submissions for the scheduler to validate.
    pub fn submit(&self) -> String {
        format!("{}.submit", self.prefix)
    }

    /// Validated tasks of one priority, consumed by workers.
    pub fn tasks(&self, priority: Priority) -> String {
        format!("{}.tasks.{}", self.prefix, priority.as_str())
    }

    /// Submissions the scheduler refused, with the reason in headers.
    pub fn rejected(&self) -> String {
        format!("{}.rejected", self.prefix)
    }

    /// Tasks that ended `failed`, with their envelope and last error.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Every topic Fleet needs, in creation order.
    pub fn all(&self) -> Vec<String> {
        let mut all = vec![self.submit()];
        all.extend(Priority::ALL.map(|p| self.tasks(p)));
        all.push(self.rejected());
        all.push(self.dead());
        all
    }

    /// The priority whose task topic is `topic`, if it is one.
    pub fn priority_of(&self, topic: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| self.tasks(*p) == topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        let t = Topics::from_settings(&TopicSettings::default());
        assert_eq!(
            t.all(),
            [
                "fleet.submit",
                "fleet.tasks.critical",
                "fleet.tasks.high",
                "fleet.tasks.normal",
                "fleet.tasks.low",
                "fleet.rejected",
                "fleet.dead"
            ]
        );
        assert_eq!(t.priority_of("fleet.tasks.low"), Some(Priority::Low));
        assert_eq!(t.priority_of("fleet.submit"), None);
    }

    #[test]
    fn prefix_applies_to_every_topic() {
        let t = Topics::new("acme-prod");
        assert!(t.all().iter().all(|name| name.starts_with("acme-prod.")));
        assert_eq!(t.tasks(Priority::High), "acme-prod.tasks.high");
    }
}
