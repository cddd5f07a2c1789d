//! Lists in pieces: a search term and a page (`?q=…&offset=N&limit=M`) for the endpoint and
//! service lists of hubs and agents, so that callers ask for what they show. Pure: parsing and
//! matching, with table tests.

use crate::model::{Endpoint, EndpointRef, Service};
use crate::wire::{EndpointInfo, ServiceInfo};

/// Most items one page may hold.
pub const MAX_LIMIT: usize = 10_000;

/// What part of a list a request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only items whose name, user or id contains this, ignoring case.
    pub q: Option<String>,
    pub offset: usize,
    /// At most this many (at most [`MAX_LIMIT`]); `None`: all from `offset`.
    pub limit: Option<usize>,
}

impl ListQuery {
    /// Reads `q`, `offset` and `limit` from a query string (other parameters are ignored).
    pub fn parse(query: Option<&str>) -> Result<ListQuery, String> {
        let mut out = ListQuery::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8()
                .map_err(|_| format!("{k}: not UTF-8"))?
                .into_owned();
            match k {
                "q" if !v.is_empty() => out.q = Some(v.to_lowercase()),
                "q" => {}
                "offset" => {
                    out.offset = v
                        .parse()
                        .map_err(|_| format!("offset: {v:?} is not a whole number"))?
                }
                "limit" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| format!("limit: {v:?} is not a whole number"))?;
                    if n == 0 || n > MAX_LIMIT {
                        return Err(format!("limit: give 1 to {MAX_LIMIT}"));
                    }
                    out.limit = Some(n);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Whether the whole list is asked for.
    pub fn is_all(&self) -> bool {
        self.q.is_none() && self.offset == 0 && self.limit.is_none()
    }

    fn hit(&self, fields: &[&str]) -> bool {
        self.q
            .as_deref()
            .is_none_or(|q| fields.iter().any(|f| f.to_lowercase().contains(q)))
    }

    /// The page of `items` that match: the page, and how many match in all.
    pub fn page<T>(
        &self,
        items: impl Iterator<Item = T>,
        fields: impl Fn(&T) -> Vec<&str>,
    ) -> (Vec<T>, usize) {
        let mut total = 0;
        let mut page = Vec::new();
        for item in items {
            if !self.hit(&fields(&item)) {
                continue;
            }
            if total >= self.offset && self.limit.is_none_or(|l| page.len() < l) {
                page.push(item);
            }
            total += 1;
        }
        (page, total)
    }
}

/// What a search looks at in an endpoint.
pub fn endpoint_fields(e: &EndpointInfo) -> Vec<&str> {
    vec![&e.name, &e.username, &e.id]
}

/// What a search looks at in a service: its name, and its providers' names and users.
pub fn service_fields(s: &ServiceInfo) -> Vec<&str> {
    let mut f = vec![s.name.as_str()];
    for e in &s.endpoints {
        f.push(&e.name);
        f.push(&e.username);
    }
    f
}

/// What a search looks at in a provider (an exit, say): its name, user and id.
pub fn provider_fields(e: &EndpointRef) -> Vec<&str> {
    vec![&e.name, &e.username, &e.id]
}

/// What a search looks at in an endpoint as an agent lists it.
pub fn agent_endpoint_fields(e: &Endpoint) -> Vec<&str> {
    vec![&e.name, &e.username, &e.id]
}

/// What a search looks at in a service as an agent lists it.
pub fn agent_service_fields(s: &Service) -> Vec<&str> {
    let mut f = vec![s.name.as_str()];
    for e in &s.endpoints {
        f.push(&e.name);
        f.push(&e.username);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse() {
        let ok: Vec<(Option<&str>, ListQuery)> = vec![
            (None, ListQuery::default()),
            (Some(""), ListQuery::default()),
            (
                Some("q=Office%20PC&offset=20&limit=10&other=1"),
                ListQuery {
                    q: Some("office pc".into()),
                    offset: 20,
                    limit: Some(10),
                },
            ),
            (
                Some("q=a+b"),
                ListQuery {
                    q: Some("a b".into()),
                    ..Default::default()
                },
            ),
            (Some("q="), ListQuery::default()),
        ];
        for (text, want) in ok {
            assert_eq!(ListQuery::parse(text), Ok(want), "{text:?}");
        }
        for bad in ["offset=x", "limit=0", "limit=10001", "limit=-1", "q=%ff"] {
            assert!(ListQuery::parse(Some(bad)).is_err(), "{bad}");
        }
        assert!(ListQuery::default().is_all());
        assert!(!ListQuery::parse(Some("limit=5")).unwrap().is_all());
    }

    #[test]
    fn pages_count_every_match() {
        let items: Vec<String> = (0..25).map(|i| format!("host{i}")).collect();
        let q = |text| ListQuery::parse(Some(text)).unwrap();
        let names = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>();
        let (page, total) = q("limit=10&offset=20").page(items.iter(), |s| vec![s.as_str()]);
        assert_eq!(
            (names(page), total),
            (
                vec![
                    "host20".to_string(),
                    "host21".into(),
                    "host22".into(),
                    "host23".into(),
                    "host24".into()
                ],
                25
            )
        );
        let (page, total) = q("q=HOST1").page(items.iter(), |s| vec![s.as_str()]);
        assert_eq!(total, 11, "host1 and host10-19");
        assert_eq!(page.len(), 11);
        let (page, total) = q("q=host1&limit=3").page(items.iter(), |s| vec![s.as_str()]);
        assert_eq!((page.len(), total), (3, 11));
        let (page, total) = q("offset=100").page(items.iter(), |s| vec![s.as_str()]);
        assert_eq!((page.len(), total), (0, 25));
    }
}
