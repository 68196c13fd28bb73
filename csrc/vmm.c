/* lora_ipc._native: CUDA virtual memory management (VMM) primitives, driver loaded at run time.
 *
 * Built with a plain C compiler: no CUDA toolkit, no torch headers. The few driver types used are
 * declared below with the layout of cuda.h (CUDA >= 11.3, unchanged through 13), and libcuda.so.1 is
 * opened with dlopen the first time a function needs it; every entry point is resolved through
 * cuGetProcAddress (as NCCL does), so one build serves any torch and any driver >= 11.3.
 *
 * Why native and not ctypes: the structs' ABI is written once here and checked by the compiler;
 * every multi-step operation (reserve + map + set access, import + map) undoes what it did on any
 * failure in one place; the GIL is dropped around driver calls; and a Mapping object unmaps and
 * frees its address range in its destructor, so a mapping whose Python wrapper is collected (or a
 * torch tensor built over it through __cuda_array_interface__ dies) never leaks device memory.
 *
 * Built as a limited-API (abi3) extension: one wheel per platform for every Python >= 3.10.
 */
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the driver types we use (cuda.h layout) -------------------------------------------------- */

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;

enum { CUDA_SUCCESS = 0 };
enum { CU_MEM_ALLOCATION_TYPE_PINNED = 1 };
enum { CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1 };
enum { CU_MEM_LOCATION_TYPE_DEVICE = 1 };
enum { CU_MEM_ACCESS_FLAGS_PROT_READ = 1, CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3 };
enum { CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1 };
enum {
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102,
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103,
};

typedef struct {
    int type;
    int id;
} CUmemLocation;

typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags;
} CUmemAccessDesc;

typedef struct {
    unsigned char bytes[16];
} CUuuid;

/* ---- the entry points, resolved once ----------------------------------------------------------- */

typedef CUresult (*PFN_getProcAddress)(const char *, void **, int, unsigned long long);

static struct {
    CUresult (*Init)(unsigned int);
    CUresult (*DriverGetVersion)(int *);
    CUresult (*GetErrorString)(CUresult, const char **);
    CUresult (*GetErrorName)(CUresult, const char **);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetCount)(int *);
    CUresult (*DeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*DeviceGetUuid)(CUuuid *, CUdevice);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*CtxGetCurrent)(CUcontext *);
    CUresult (*CtxSetCurrent)(CUcontext);
    CUresult (*MemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
    CUresult (*MemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
    CUresult (*MemRelease)(CUmemGenericAllocationHandle);
    CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*MemAddressFree)(CUdeviceptr, size_t);
    CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*MemUnmap)(CUdeviceptr, size_t);
    CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*MemExportToShareableHandle)(void *, CUmemGenericAllocationHandle, int, unsigned long long);
    CUresult (*MemImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *, int);
} cu;

#define MAX_DEVICES 64
static int loaded = 0;               /* 0 not tried, 1 ok, -1 failed (reason in load_error) */
static char load_error[512];
static int driver_version = 0;
static CUcontext primary[MAX_DEVICES];

static PyObject *NativeError;        /* lora_ipc._native.NativeError(code, message) */

#define RESOLVE(field, name)                                                                    \
    do {                                                                                        \
        void *fn = NULL;                                                                        \
        if (get(name, &fn, 11030, 0) != CUDA_SUCCESS || fn == NULL) {                           \
            snprintf(load_error, sizeof load_error, "the CUDA driver lacks %s (too old?)", name); \
            return -1;                                                                          \
        }                                                                                       \
        memcpy(&cu.field, &fn, sizeof fn);                                                      \
    } while (0)

static int load_driver_once(void) {
    const char *path = getenv("LORA_IPC_LIBCUDA");  /* tests point this at a stub driver */
    if (path == NULL || path[0] == '\0')
        path = "libcuda.so.1";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error, "no CUDA driver: cannot load %s (%s)", path, why ? why : "?");
        return -1;
    }
    PFN_getProcAddress get;
    void *sym = dlsym(lib, "cuGetProcAddress");
    if (sym == NULL) {
        snprintf(load_error, sizeof load_error, "no CUDA driver: %s has no cuGetProcAddress (driver < 11.3)", path);
        return -1;
    }
    memcpy(&get, &sym, sizeof sym);
    RESOLVE(Init, "cuInit");
    RESOLVE(DriverGetVersion, "cuDriverGetVersion");
    RESOLVE(GetErrorString, "cuGetErrorString");
    RESOLVE(GetErrorName, "cuGetErrorName");
    RESOLVE(DeviceGet, "cuDeviceGet");
    RESOLVE(DeviceGetCount, "cuDeviceGetCount");
    RESOLVE(DeviceGetAttribute, "cuDeviceGetAttribute");
    RESOLVE(DeviceGetUuid, "cuDeviceGetUuid");
    RESOLVE(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    RESOLVE(CtxGetCurrent, "cuCtxGetCurrent");
    RESOLVE(CtxSetCurrent, "cuCtxSetCurrent");
    RESOLVE(MemGetAllocationGranularity, "cuMemGetAllocationGranularity");
    RESOLVE(MemCreate, "cuMemCreate");
    RESOLVE(MemRelease, "cuMemRelease");
    RESOLVE(MemAddressReserve, "cuMemAddressReserve");
    RESOLVE(MemAddressFree, "cuMemAddressFree");
    RESOLVE(MemMap, "cuMemMap");
    RESOLVE(MemUnmap, "cuMemUnmap");
    RESOLVE(MemSetAccess, "cuMemSetAccess");
    RESOLVE(MemExportToShareableHandle, "cuMemExportToShareableHandle");
    RESOLVE(MemImportFromShareableHandle, "cuMemImportFromShareableHandle");
    CUresult rc = cu.Init(0);
    if (rc != CUDA_SUCCESS) {
        const char *name = NULL;
        if (cu.GetErrorName(rc, &name) != CUDA_SUCCESS || name == NULL)
            name = "?";
        snprintf(load_error, sizeof load_error, "no usable CUDA driver: cuInit failed (%s, %d)", name, rc);
        return -1;
    }
    cu.DriverGetVersion(&driver_version);
    return 0;
}

/* Load the driver the first time (under the GIL, so once). Sets a Python error and returns -1 on failure. */
static int need_driver(void) {
    if (loaded == 0)
        loaded = load_driver_once() == 0 ? 1 : -1;
    if (loaded < 0) {
        PyObject *args = Py_BuildValue("(is)", -1, load_error);
        if (args != NULL) {
            PyErr_SetObject(NativeError, args);
            Py_DECREF(args);
        }
        return -1;
    }
    return 0;
}

static PyObject *cu_error(CUresult rc, const char *what) {
    const char *name = NULL, *text = NULL;
    if (cu.GetErrorName == NULL || cu.GetErrorName(rc, &name) != CUDA_SUCCESS || name == NULL)
        name = "CUDA_ERROR_?";
    if (cu.GetErrorString == NULL || cu.GetErrorString(rc, &text) != CUDA_SUCCESS || text == NULL)
        text = "";
    char message[512];
    snprintf(message, sizeof message, "%s failed: %s (%d): %s", what, name, (int)rc, text);
    PyObject *args = Py_BuildValue("(is)", (int)rc, message);
    if (args != NULL) {
        PyErr_SetObject(NativeError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* Make the device's primary context current on this thread if none is (torch uses the same context). */
static CUresult use_device(int ordinal) {
    if (ordinal < 0 || ordinal >= MAX_DEVICES)
        return 101; /* CUDA_ERROR_INVALID_DEVICE */
    CUcontext current = NULL;
    CUresult rc = cu.CtxGetCurrent(&current);
    if (rc != CUDA_SUCCESS)
        return rc;
    if (primary[ordinal] == NULL) {
        CUdevice dev;
        if ((rc = cu.DeviceGet(&dev, ordinal)) != CUDA_SUCCESS)
            return rc;
        if ((rc = cu.DevicePrimaryCtxRetain(&primary[ordinal], dev)) != CUDA_SUCCESS)
            return rc;
    }
    if (current == NULL)
        rc = cu.CtxSetCurrent(primary[ordinal]);
    return rc;
}

static void fill_prop(CUmemAllocationProp *prop, int ordinal) {
    memset(prop, 0, sizeof *prop);
    prop->type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop->requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop->location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop->location.id = ordinal;
}

/* ---- Mapping: a reserved, mapped address range; unmapped and freed by close() or the destructor ---- */

typedef struct {
    PyObject_HEAD
    CUdeviceptr ptr;
    size_t size;
    int device;
    int writable;
} Mapping;

static PyTypeObject *MappingType;

static void mapping_unmap(Mapping *self) {
    if (self->ptr != 0 && loaded > 0) {
        CUdeviceptr ptr = self->ptr;
        size_t size = self->size;
        self->ptr = 0;
        use_device(self->device);
        cu.MemUnmap(ptr, size);
        cu.MemAddressFree(ptr, size);
    }
}

static void mapping_dealloc(PyObject *obj) {
    mapping_unmap((Mapping *)obj);
    PyTypeObject *tp = Py_TYPE(obj);
    PyObject_Free(obj);
    Py_DECREF(tp);
}

static PyObject *mapping_close(PyObject *obj, PyObject *unused) {
    (void)unused;
    mapping_unmap((Mapping *)obj);
    Py_RETURN_NONE;
}

static PyObject *mapping_get_ptr(PyObject *obj, void *c) {
    (void)c;
    return PyLong_FromUnsignedLongLong(((Mapping *)obj)->ptr);
}
static PyObject *mapping_get_size(PyObject *obj, void *c) {
    (void)c;
    return PyLong_FromSize_t(((Mapping *)obj)->size);
}
static PyObject *mapping_get_device(PyObject *obj, void *c) {
    (void)c;
    return PyLong_FromLong(((Mapping *)obj)->device);
}
static PyObject *mapping_get_writable(PyObject *obj, void *c) {
    (void)c;
    return PyBool_FromLong(((Mapping *)obj)->writable);
}

static PyMethodDef mapping_methods[] = {
    {"close", mapping_close, METH_NOARGS, "Unmap and free the address range (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef mapping_getset[] = {
    {"ptr", mapping_get_ptr, NULL, "device address (0 once closed)", NULL},
    {"size", mapping_get_size, NULL, "bytes mapped", NULL},
    {"device", mapping_get_device, NULL, "device ordinal", NULL},
    {"writable", mapping_get_writable, NULL, "mapped read-write (else read-only)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot mapping_slots[] = {
    {Py_tp_dealloc, (void *)mapping_dealloc},
    {Py_tp_methods, mapping_methods},
    {Py_tp_getset, mapping_getset},
    {Py_tp_doc, (void *)"A mapped CUDA VMM address range (see lora_ipc.core.memory.native)."},
    {0, NULL},
};

static PyType_Spec mapping_spec = {
    "lora_ipc._native.Mapping", sizeof(Mapping), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, mapping_slots,
};

/* ---- module functions -------------------------------------------------------------------------- */

static PyObject *py_driver_status(PyObject *m, PyObject *unused) {
    (void)m, (void)unused;
    if (loaded == 0)
        loaded = load_driver_once() == 0 ? 1 : -1;
    if (loaded < 0)
        return Py_BuildValue("(Os)", Py_False, load_error);
    return Py_BuildValue("(Oi)", Py_True, driver_version);
}

static PyObject *py_device_info(PyObject *m, PyObject *args) {
    (void)m;
    int ordinal, vmm = 0, posix = 0;
    CUdevice dev;
    CUuuid uuid;
    if (!PyArg_ParseTuple(args, "i", &ordinal) || need_driver() < 0)
        return NULL;
    CUresult rc = cu.DeviceGet(&dev, ordinal);
    if (rc != CUDA_SUCCESS)
        return cu_error(rc, "cuDeviceGet");
    if ((rc = cu.DeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev)) != CUDA_SUCCESS)
        return cu_error(rc, "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)");
    if ((rc = cu.DeviceGetAttribute(&posix, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev))
        != CUDA_SUCCESS)
        return cu_error(rc, "cuDeviceGetAttribute(HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)");
    if ((rc = cu.DeviceGetUuid(&uuid, dev)) != CUDA_SUCCESS)
        return cu_error(rc, "cuDeviceGetUuid");
    return Py_BuildValue("{s:O,s:O,s:y#}", "vmm", vmm ? Py_True : Py_False, "posix_fd", posix ? Py_True : Py_False,
                         "uuid", (const char *)uuid.bytes, (Py_ssize_t)16);
}

static PyObject *py_granularity(PyObject *m, PyObject *args) {
    (void)m;
    int ordinal;
    size_t gran = 0;
    CUmemAllocationProp prop;
    if (!PyArg_ParseTuple(args, "i", &ordinal) || need_driver() < 0)
        return NULL;
    fill_prop(&prop, ordinal);
    CUresult rc;
    Py_BEGIN_ALLOW_THREADS
    rc = use_device(ordinal);
    if (rc == CUDA_SUCCESS)
        rc = cu.MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    Py_END_ALLOW_THREADS
    if (rc != CUDA_SUCCESS)
        return cu_error(rc, "cuMemGetAllocationGranularity");
    return PyLong_FromSize_t(gran);
}

/* map(handle, size, device, writable) -> Mapping. Reserve, map, set access; undo everything on failure. */
static PyObject *map_handle(CUmemGenericAllocationHandle handle, size_t size, int ordinal, int writable,
                            const char **failed, CUresult *rc_out) {
    CUdeviceptr ptr = 0;
    CUresult rc;
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = ordinal;
    access.flags = writable ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE : CU_MEM_ACCESS_FLAGS_PROT_READ;
    Py_BEGIN_ALLOW_THREADS
    *failed = "cuMemAddressReserve";
    rc = cu.MemAddressReserve(&ptr, size, 0, 0, 0);
    if (rc == CUDA_SUCCESS) {
        *failed = "cuMemMap";
        rc = cu.MemMap(ptr, size, 0, handle, 0);
        if (rc == CUDA_SUCCESS) {
            *failed = "cuMemSetAccess";
            rc = cu.MemSetAccess(ptr, size, &access, 1);
            if (rc != CUDA_SUCCESS)
                cu.MemUnmap(ptr, size);
        }
        if (rc != CUDA_SUCCESS)
            cu.MemAddressFree(ptr, size);
    }
    Py_END_ALLOW_THREADS
    *rc_out = rc;
    if (rc != CUDA_SUCCESS)
        return NULL;
    Mapping *mapping = PyObject_New(Mapping, MappingType);
    if (mapping == NULL) {
        cu.MemUnmap(ptr, size);
        cu.MemAddressFree(ptr, size);
        return NULL;
    }
    mapping->ptr = ptr;
    mapping->size = size;
    mapping->device = ordinal;
    mapping->writable = writable;
    return (PyObject *)mapping;
}

/* create(device, size) -> (Mapping read-write, exported fd). The allocation handle is released at once:
 * the mapping and the fd each keep the physical memory alive, it is freed when both are gone (and every
 * importer's mapping). */
static PyObject *py_create(PyObject *m, PyObject *args) {
    (void)m;
    int ordinal;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in", &ordinal, &size) || need_driver() < 0)
        return NULL;
    if (size <= 0)
        return PyErr_Format(PyExc_ValueError, "size must be positive, not %zd", size);
    CUmemAllocationProp prop;
    fill_prop(&prop, ordinal);
    CUmemGenericAllocationHandle handle = 0;
    int fd = -1;
    CUresult rc;
    const char *failed = "cuCtxSetCurrent";
    Py_BEGIN_ALLOW_THREADS
    rc = use_device(ordinal);
    if (rc == CUDA_SUCCESS) {
        failed = "cuMemCreate";
        rc = cu.MemCreate(&handle, (size_t)size, &prop, 0);
    }
    if (rc == CUDA_SUCCESS) {
        failed = "cuMemExportToShareableHandle";
        rc = cu.MemExportToShareableHandle(&fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        if (rc != CUDA_SUCCESS) {
            cu.MemRelease(handle);
            handle = 0;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != CUDA_SUCCESS)
        return cu_error(rc, failed);
    PyObject *mapping = map_handle(handle, (size_t)size, ordinal, 1, &failed, &rc);
    cu.MemRelease(handle);
    if (mapping == NULL) {
        close(fd);
        return PyErr_Occurred() ? NULL : cu_error(rc, failed);
    }
    PyObject *result = Py_BuildValue("(Ni)", mapping, fd);
    if (result == NULL)
        close(fd);
    return result;
}

/* import_fd(fd, size, device, writable=False) -> Mapping. The fd is not closed (the caller owns it). */
static PyObject *py_import_fd(PyObject *m, PyObject *args) {
    (void)m;
    int fd, ordinal, writable = 0;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "ini|p", &fd, &size, &ordinal, &writable) || need_driver() < 0)
        return NULL;
    if (size <= 0)
        return PyErr_Format(PyExc_ValueError, "size must be positive, not %zd", size);
    if (fd < 0)
        return PyErr_Format(PyExc_ValueError, "not a descriptor: %d", fd);
    CUmemGenericAllocationHandle handle = 0;
    CUresult rc;
    const char *failed = "cuCtxSetCurrent";
    Py_BEGIN_ALLOW_THREADS
    rc = use_device(ordinal);
    if (rc == CUDA_SUCCESS) {
        failed = "cuMemImportFromShareableHandle";
        rc = cu.MemImportFromShareableHandle(&handle, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    }
    Py_END_ALLOW_THREADS
    if (rc != CUDA_SUCCESS)
        return cu_error(rc, failed);
    PyObject *mapping = map_handle(handle, (size_t)size, ordinal, writable, &failed, &rc);
    cu.MemRelease(handle); /* the mapping keeps the memory */
    if (mapping == NULL)
        return PyErr_Occurred() ? NULL : cu_error(rc, failed);
    return mapping;
}

static PyMethodDef module_methods[] = {
    {"driver_status", py_driver_status, METH_NOARGS,
     "driver_status() -> (True, driver_version) or (False, why): loads libcuda.so.1 once."},
    {"device_info", py_device_info, METH_VARARGS,
     "device_info(ordinal) -> {'vmm': bool, 'posix_fd': bool, 'uuid': bytes(16)}"},
    {"granularity", py_granularity, METH_VARARGS,
     "granularity(ordinal) -> recommended size granule of a pinned, POSIX-fd-exportable allocation"},
    {"create", py_create, METH_VARARGS,
     "create(ordinal, size) -> (Mapping, fd): cuMemCreate, exported as a POSIX fd, mapped read-write"},
    {"import_fd", py_import_fd, METH_VARARGS,
     "import_fd(fd, size, ordinal, writable=False) -> Mapping: cuMemImportFromShareableHandle, mapped"},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module) {
    NativeError = PyErr_NewException("lora_ipc._native.NativeError", PyExc_RuntimeError, NULL);
    if (NativeError == NULL || PyModule_AddObject(module, "NativeError", NativeError) < 0)
        return -1;
    Py_INCREF(NativeError);
    MappingType = (PyTypeObject *)PyType_FromSpec(&mapping_spec);
    if (MappingType == NULL)
        return -1;
    Py_INCREF(MappingType);
    if (PyModule_AddObject(module, "Mapping", (PyObject *)MappingType) < 0)
        return -1;
    return 0;
}

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native", "CUDA VMM primitives, driver loaded at run time (see csrc/vmm.c).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *module = PyModule_Create(&moduledef);
    if (module != NULL && module_exec(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
