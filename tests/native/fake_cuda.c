/* A stand-in for libcuda.so.1 that implements the VMM calls lora_ipc uses on host memory, so the
 * native extension (csrc/vmm.c) runs its real code paths on a machine without a GPU:
 *   allocation  = a memfd named "fake-cuda" of the requested size (handle = its fd + 1)
 *   export      = dup of that memfd; import = dup of the given fd (refused unless it is a fake-cuda memfd)
 *   reserve     = an anonymous PROT_NONE range; map = the memfd mapped MAP_FIXED over it
 *   set access  = mprotect (READ -> PROT_READ, READWRITE -> PROT_READ|PROT_WRITE)
 * FAKE_CUDA_INIT_ERROR=<n> makes cuInit return n. Built by tests/test_native.py with cc. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef unsigned long long u64;
typedef struct { int type, id; } Loc;
typedef struct { Loc location; int flags; } Access;

static int init(unsigned f) { (void)f; const char *e = getenv("FAKE_CUDA_INIT_ERROR"); return e ? atoi(e) : 0; }
static int version(int *v) { *v = 12080; return 0; }
static int errname(int rc, const char **s) { *s = rc == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_FAKE"; return 0; }
static int errstring(int rc, const char **s) { (void)rc; *s = "fake driver error"; return 0; }
static int device_get(int *d, int i) { *d = i; return i == 0 ? 0 : 101; }
static int device_count(int *n) { *n = 1; return 0; }
static int attribute(int *v, int a, int d) { (void)a; (void)d; *v = 1; return 0; }
static int uuid(unsigned char *u, int d) { (void)d; memset(u, 0xab, 16); return 0; }
static int ctx_dummy;
static void *current;
static int ctx_retain(void **c, int d) { (void)d; *c = &ctx_dummy; return 0; }
static int ctx_get(void **c) { *c = current; return 0; }
static int ctx_set(void *c) { current = c; return 0; }
static int granularity(size_t *g, const void *p, int o) { (void)p; (void)o; *g = 2 << 20; return 0; }

static int is_fake(int fd, size_t *size) {
    char link[64], target[256];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    struct stat st;
    if (strncmp(target, "/memfd:fake-cuda", 16) != 0 || fstat(fd, &st) != 0) return 0;
    if (size) *size = (size_t)st.st_size;
    return 1;
}
static int mem_create(u64 *h, size_t size, const void *prop, u64 flags) {
    (void)prop; (void)flags;
    int fd = memfd_create("fake-cuda", MFD_CLOEXEC);
    if (fd < 0) return 2;
    if (ftruncate(fd, (off_t)size) != 0) { close(fd); return 2; }
    *h = (u64)fd + 1;
    return 0;
}
static int mem_release(u64 h) { return close((int)h - 1) == 0 ? 0 : 1; }
static int export_fd(void *out, u64 h, int type, u64 flags) {
    (void)flags;
    if (type != 1) return 1;
    int fd = dup((int)h - 1);
    if (fd < 0) return 2;
    *(int *)out = fd;
    return 0;
}
static int import_fd(u64 *h, void *os_handle, int type) {
    int fd = (int)(uintptr_t)os_handle;
    if (type != 1 || !is_fake(fd, NULL)) return 1;
    int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) return 2;
    *h = (u64)copy + 1;
    return 0;
}
static int reserve(u64 *ptr, size_t size, size_t align, u64 addr, u64 flags) {
    (void)align; (void)addr; (void)flags;
    void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return 2;
    *ptr = (u64)(uintptr_t)p;
    return 0;
}
static int address_free(u64 ptr, size_t size) { return munmap((void *)(uintptr_t)ptr, size) == 0 ? 0 : 1; }
static int mem_map(u64 ptr, size_t size, size_t offset, u64 h, u64 flags) {
    (void)flags;
    size_t have = 0;
    if (!is_fake((int)h - 1, &have) || offset + size > have) return 1;
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, (int)h - 1, (off_t)offset);
    return p == MAP_FAILED ? 2 : 0;
}
static int mem_unmap(u64 ptr, size_t size) {
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    return p == MAP_FAILED ? 1 : 0;
}
static int set_access(u64 ptr, size_t size, const Access *a, size_t n) {
    if (n != 1) return 1;
    int prot = a->flags == 3 ? PROT_READ | PROT_WRITE : a->flags == 1 ? PROT_READ : PROT_NONE;
    if (getenv("FAKE_CUDA_ACCESS_ERROR") && a->flags == 1) return 1; /* read-only access refused */
    return mprotect((void *)(uintptr_t)ptr, size, prot) == 0 ? 0 : 1;
}

static const struct { const char *name; void *fn; } table[] = {
    {"cuInit", (void *)init}, {"cuDriverGetVersion", (void *)version}, {"cuGetErrorName", (void *)errname},
    {"cuGetErrorString", (void *)errstring}, {"cuDeviceGet", (void *)device_get},
    {"cuDeviceGetCount", (void *)device_count}, {"cuDeviceGetAttribute", (void *)attribute},
    {"cuDeviceGetUuid", (void *)uuid}, {"cuDevicePrimaryCtxRetain", (void *)ctx_retain},
    {"cuCtxGetCurrent", (void *)ctx_get}, {"cuCtxSetCurrent", (void *)ctx_set},
    {"cuMemGetAllocationGranularity", (void *)granularity}, {"cuMemCreate", (void *)mem_create},
    {"cuMemRelease", (void *)mem_release}, {"cuMemAddressReserve", (void *)reserve},
    {"cuMemAddressFree", (void *)address_free}, {"cuMemMap", (void *)mem_map}, {"cuMemUnmap", (void *)mem_unmap},
    {"cuMemSetAccess", (void *)set_access}, {"cuMemExportToShareableHandle", (void *)export_fd},
    {"cuMemImportFromShareableHandle", (void *)import_fd},
};

int cuGetProcAddress(const char *symbol, void **pfn, int version_, u64 flags) {
    (void)version_; (void)flags;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(table[i].name, symbol) == 0) { *pfn = table[i].fn; return 0; }
    *pfn = NULL;
    return 500; /* CUDA_ERROR_NOT_FOUND */
}
