/*
 * A deliberately misbehaving Triton backend, compiled by tests/triton_host.rs with `cc -shared`
 * and loaded by the test host. It proves the host's rule checks fire through the real C ABI.
 *
 * It is a decoupled echo model: each request's `text_input` comes back as `text_output` in one
 * FINAL response. What it does wrong depends on the request id (per request) and on the
 * environment variable BAD_BACKEND_MODE (lifecycle), so one run shows many violations:
 *
 *   good                 everything right (no violation may mention it)
 *   double-release       RequestRelease twice
 *   no-final             one response without the FINAL flag
 *   second-final         FINAL, then another FINAL through the factory
 *   leak-error           an error passed to ResponseSend and never deleted
 *   use-after-release    TRITONBACKEND_RequestId after the release
 *   no-stats             released without ModelInstanceReportStatistics
 *   execute-error        Execute returns an error after releasing the request
 *   input-after-release  reads the input buffer after the release (the host's guard faults)
 *   wrong-size           OutputBuffer smaller than the BYTES element it then writes
 *   overrun              writes one byte past the end of its output buffer (the guard page faults)
 *
 *   BAD_BACKEND_MODE=delete-backend-config  MessageDelete on the BackendConfig message
 *   BAD_BACKEND_MODE=leak-model-config      the ModelConfig message is never deleted
 *
 * Only the handful of declarations it needs; handles are opaque pointers.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef void H;

extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(uint32_t code, const char* msg);
extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* e);
extern TRITONSERVER_Error* TRITONSERVER_MessageDelete(H* m);
extern TRITONSERVER_Error* TRITONBACKEND_BackendConfig(H* backend, H** msg);
extern TRITONSERVER_Error* TRITONBACKEND_ModelConfig(H* model, uint32_t version, H** msg);
extern TRITONSERVER_Error* TRITONBACKEND_RequestId(H* req, const char** id);
extern TRITONSERVER_Error* TRITONBACKEND_RequestInput(H* req, const char* name, H** input);
extern TRITONSERVER_Error* TRITONBACKEND_InputBuffer(
    H* input, uint32_t index, const void** buf, uint64_t* size, uint32_t* mt, int64_t* mtid);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseFactoryNew(H** f, H* req);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseFactoryDelete(H* f);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseFactorySendFlags(H* f, uint32_t flags);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseNewFromFactory(H** r, H* f);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(
    H* r, H** out, const char* name, uint32_t dt, const int64_t* shape, uint32_t dims);
extern TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(
    H* out, void** buf, uint64_t size, uint32_t* mt, int64_t* mtid);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseSend(H* r, uint32_t flags, TRITONSERVER_Error* e);
extern TRITONSERVER_Error* TRITONBACKEND_RequestRelease(H* req, uint32_t flags);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(
    H* inst, H* req, bool ok, uint64_t a, uint64_t b, uint64_t c, uint64_t d);

#define FINAL 1u
#define RELEASE_ALL 1u
#define TYPE_BYTES 13u
#define INVALID_ARG 3u

static uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Deletes an error a call returned (none expected from a well-formed call). */
static void check(TRITONSERVER_Error* e)
{
  if (e != NULL) {
    TRITONSERVER_ErrorDelete(e);
  }
}

static bool mode(const char* m)
{
  const char* v = getenv("BAD_BACKEND_MODE");
  return v != NULL && strstr(v, m) != NULL;
}

TRITONSERVER_Error* TRITONBACKEND_Initialize(H* backend)
{
  if (mode("delete-backend-config")) {
    H* msg = NULL;
    check(TRITONBACKEND_BackendConfig(backend, &msg));
    check(TRITONSERVER_MessageDelete(msg));
  }
  return NULL;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(H* model)
{
  H* msg = NULL;
  check(TRITONBACKEND_ModelConfig(model, 1, &msg));
  if (!mode("leak-model-config")) {
    check(TRITONSERVER_MessageDelete(msg));
  }
  return NULL;
}

/* One FINAL echo response (unless told otherwise) through a factory. */
static void respond(H* factory, const void* data, uint64_t size, uint32_t flags,
                    TRITONSERVER_Error* err, uint64_t buffer_size, uint64_t write_size)
{
  H* resp = NULL;
  check(TRITONBACKEND_ResponseNewFromFactory(&resp, factory));
  int64_t shape[2] = {1, 1};
  H* out = NULL;
  check(TRITONBACKEND_ResponseOutput(resp, &out, "text_output", TYPE_BYTES, shape, 2));
  void* buf = NULL;
  uint32_t mt = 0;
  int64_t mtid = 0;
  check(TRITONBACKEND_OutputBuffer(out, &buf, buffer_size, &mt, &mtid));
  if (buf != NULL) {
    /* The input is already in the BYTES wire format: one element. */
    memcpy(buf, data, size < write_size ? size : write_size);
    if (write_size > size) {
      memset((char*)buf + size, 0, write_size - size);
    }
  }
  check(TRITONBACKEND_ResponseSend(resp, flags, err));
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(H* instance, H** requests, uint32_t n)
{
  for (uint32_t i = 0; i < n; i++) {
    H* req = requests[i];
    uint64_t t0 = now_ns();
    const char* id_ptr = NULL;
    check(TRITONBACKEND_RequestId(req, &id_ptr));
    char id[64];
    strncpy(id, id_ptr, sizeof id - 1);
    id[sizeof id - 1] = 0;

    H* input = NULL;
    check(TRITONBACKEND_RequestInput(req, "text_input", &input));
    const void* data = NULL;
    uint64_t size = 0;
    uint32_t mt = 0;
    int64_t mtid = 0;
    check(TRITONBACKEND_InputBuffer(input, 0, &data, &size, &mt, &mtid));
    void* copy = malloc(size ? size : 1);
    memcpy(copy, data, size);

    H* factory = NULL;
    check(TRITONBACKEND_ResponseFactoryNew(&factory, req));
    uint64_t t1 = now_ns();

    if (strcmp(id, "no-final") == 0) {
      respond(factory, copy, size, 0, NULL, size, size);
    } else if (strcmp(id, "leak-error") == 0) {
      respond(factory, copy, size, FINAL, TRITONSERVER_ErrorNew(INVALID_ARG, "never deleted"), size,
              size);
    } else if (strcmp(id, "wrong-size") == 0) {
      respond(factory, copy, size, FINAL, NULL, size - 1, size - 1);
    } else if (strcmp(id, "overrun") == 0) {
      respond(factory, copy, size, FINAL, NULL, size, size + 1);
    } else {
      respond(factory, copy, size, FINAL, NULL, size, size);
    }
    if (strcmp(id, "second-final") == 0) {
      check(TRITONBACKEND_ResponseFactorySendFlags(factory, FINAL));
    }
    if (strcmp(id, "no-stats") != 0) {
      uint64_t t2 = now_ns();
      uint64_t t3 = now_ns();
      check(TRITONBACKEND_ModelInstanceReportStatistics(instance, req, true, t0, t1, t2, t3));
    }
    check(TRITONBACKEND_RequestRelease(req, RELEASE_ALL));
    if (strcmp(id, "double-release") == 0) {
      check(TRITONBACKEND_RequestRelease(req, RELEASE_ALL));
    }
    if (strcmp(id, "use-after-release") == 0) {
      const char* again = NULL;
      check(TRITONBACKEND_RequestId(req, &again));
    }
    if (strcmp(id, "input-after-release") == 0) {
      volatile const char* p = (const char*)data;
      (void)p[0];
    }
    check(TRITONBACKEND_ResponseFactoryDelete(factory));
    free(copy);
    if (strcmp(id, "execute-error") == 0) {
      return TRITONSERVER_ErrorNew(INVALID_ARG, "execute failed after releasing");
    }
  }
  return NULL;
}
