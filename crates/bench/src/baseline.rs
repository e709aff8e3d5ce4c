//! The bare tonic baseline: the same `tenantmesh.data.v1.Data` contract with
//! nothing of the mesh in front of it (no token, no tenant, no policy, no
//! telemetry), so every ratio in the benchmark is the mesh against what
//! tonic itself costs on this machine, in the same run.
//!
//! - `GetItem` answers from memory a copy of the item last written under
//!   that key: a message of the same size as the mesh's answer.
//! - `PutItem` does the same redb write as the mesh's embedded store, with
//!   the same durability (one committed, fsynced write transaction per
//!   call, on the blocking pool, as a plain tonic server would).
//! - `QueryItems` reads the page from redb in key order.
//!
//! It also serves the example application's `example.orders.v1.Orders`
//! the same way (`CreateOrder` keeps the order in memory, `GetOrder`
//! answers it), the baseline of an application service's request path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use prost::Message as _;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tenantmesh_orders::proto::orders_server::{Orders, OrdersServer};
use tenantmesh_orders::proto::{
    CancelOrderRequest, CancelOrderResponse, CreateOrderRequest, CreateOrderResponse, GetOrderRequest,
    GetOrderResponse, ListOrdersRequest, ListOrdersResponse, Order, OrderStatus,
};
use tenantmesh_proto::data::v1::data_server::{Data, DataServer};
use tenantmesh_proto::data::v1::*;
use tonic::{Request, Response, Status};

const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");

#[derive(Clone)]
pub struct Baseline {
    db: Arc<Database>,
    items: Arc<RwLock<HashMap<String, Item>>>,
    orders: Arc<RwLock<HashMap<String, Order>>>,
}

fn key(collection: &str, id: &str) -> String {
    format!("{collection}#{id}")
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Baseline {
    pub fn open(path: &Path) -> Result<Self, String> {
        let db = Database::create(path).map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(ITEMS).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        Ok(Self { db: Arc::new(db), items: Default::default(), orders: Default::default() })
    }
}

#[tonic::async_trait]
impl Data for Baseline {
    async fn put_item(&self, request: Request<PutItemRequest>) -> Result<Response<PutItemResponse>, Status> {
        let req = request.into_inner();
        let k = key(&req.collection, &req.id);
        let mut item =
            Item { collection: req.collection, id: req.id, attributes: req.attributes, version: 0, update_time_ms: 0 };
        let db = self.db.clone();
        let (k2, encoded) = (k.clone(), item.encode_to_vec());
        let version = tokio::task::spawn_blocking(move || -> Result<u64, Status> {
            let txn = db.begin_write().map_err(internal)?;
            let version = {
                let mut table = txn.open_table(ITEMS).map_err(internal)?;
                let current = table
                    .get(k2.as_str())
                    .map_err(internal)?
                    .map(|v| u64::from_be_bytes(v.value()[..8].try_into().expect("8 bytes")))
                    .unwrap_or(0);
                let mut value = Vec::with_capacity(8 + encoded.len());
                value.extend_from_slice(&(current + 1).to_be_bytes());
                value.extend_from_slice(&encoded);
                table.insert(k2.as_str(), value.as_slice()).map_err(internal)?;
                current + 1
            };
            txn.commit().map_err(internal)?;
            Ok(version)
        })
        .await
        .map_err(internal)??;
        item.version = version;
        self.items.write().expect("items lock").insert(k, item.clone());
        Ok(Response::new(PutItemResponse { item: Some(item) }))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let req = request.get_ref();
        let item = self.items.read().expect("items lock").get(&key(&req.collection, &req.id)).cloned();
        match item {
            Some(item) => Ok(Response::new(GetItemResponse { item: Some(item) })),
            None => Err(Status::not_found("item not found")),
        }
    }

    async fn delete_item(&self, _request: Request<DeleteItemRequest>) -> Result<Response<DeleteItemResponse>, Status> {
        Err(Status::unimplemented("not part of the baseline"))
    }

    async fn query_items(&self, request: Request<QueryItemsRequest>) -> Result<Response<QueryItemsResponse>, Status> {
        let req = request.into_inner();
        let prefix = key(&req.collection, &req.id_prefix);
        let limit = req.page_size.clamp(1, 1000) as usize;
        let txn = self.db.begin_read().map_err(internal)?;
        let table = txn.open_table(ITEMS).map_err(internal)?;
        let mut items = Vec::with_capacity(limit);
        for entry in table.range(prefix.as_str()..).map_err(internal)? {
            let (k, v) = entry.map_err(internal)?;
            if !k.value().starts_with(prefix.as_str()) || items.len() == limit {
                break;
            }
            let raw = v.value();
            let mut item = Item::decode(&raw[8..]).map_err(internal)?;
            item.version = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
            items.push(item);
        }
        Ok(Response::new(QueryItemsResponse { items, next_page_token: String::new() }))
    }
}

#[tonic::async_trait]
impl Orders for Baseline {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let req = request.into_inner();
        let order = Order {
            order_id: req.order_id.clone(),
            product_id: req.product_id,
            quantity: req.quantity,
            status: OrderStatus::Placed.into(),
            version: 1,
            // As large as the mesh's: a time and a user id.
            created_at: 1_765_000_000_000,
            created_by: "0".repeat(36),
        };
        self.orders.write().expect("orders lock").insert(req.order_id, order.clone());
        Ok(Response::new(CreateOrderResponse { order: Some(order) }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        match self.orders.read().expect("orders lock").get(&request.get_ref().order_id) {
            Some(order) => Ok(Response::new(GetOrderResponse { order: Some(order.clone()) })),
            None => Err(Status::not_found("no such order")),
        }
    }

    async fn list_orders(&self, _request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        Err(Status::unimplemented("not part of the baseline"))
    }

    async fn cancel_order(
        &self,
        _request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        Err(Status::unimplemented("not part of the baseline"))
    }
}

/// Serves the baseline on `addr` (TCP_NODELAY on, as `Server::serve` sets
/// it) and prints `listening <addr>` once bound.
pub async fn serve(addr: SocketAddr, data_dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(data_dir).map_err(|e| e.to_string())?;
    let service = Baseline::open(&data_dir.join("baseline.redb"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(DataServer::new(service.clone()))
        .add_service(OrdersServer::new(service))
        .serve_with_incoming_shutdown(incoming, crate::procs::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
